"""The relay: the body of every streaming response, whatever its surface.

A follower (api/streams.py) yields batches of one stream's events; the relay
writes each batch in one flushed write through its surface, counts what it
relayed, times the relay lag and the first token, and ends the stream the
surface's way when this API process stops or Redis fails. A surface (native
events, OpenAI's chunks for chat and legacy completions, the Responses API's
events in api/responses/stream.py) plugs in as a `Surface`: how it writes a
batch, what it writes on an idle tick, and its two ends of its own.

The drain (docs/protocol.md, "API shutdown"): `Edge.drain` (SIGTERM) ends the
native streams at once with `reconnect`, which clients follow to another
replica; the OpenAI-shaped ones go on until `Edge.end_streams`, a second
before the grace ends, and then end with an error naming where to resume.
One rule for every surface: `edge.closing` ends every stream, `edge.draining`
those whose surface `reconnects`. The chat relay used to wait for both flags
and the Responses relay for `closing` alone; they differed only when the
lifespan closes the Edge without a drain (no SIGTERM), where a resume point
beats the Redis error the closed connections would end the stream with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Protocol

import redis

from tokenfan.api import sse
from tokenfan.api.edge import Edge
from tokenfan.api.formats import NativeWriter, Writer, openai_error
from tokenfan.api.streams import Follower
from tokenfan.shared import events
from tokenfan.shared.errors import TokenfanError
from tokenfan.shared.events import Error, Queued, Token
from tokenfan.shared.state import StreamStatus


class Surface(Protocol):
    """What one surface writes on the relay: the log's events, and what the relay itself says."""

    # Whether its streams end at the drain's start (clients that reconnect by themselves), or only
    # when the streams must end.
    reconnects: bool

    def fresh(self, follower: Follower) -> bool:
        """Whether the client has nothing yet: its first token is timed."""
        ...

    def write(self, batch: list[events.Event], follower: Follower) -> bytes: ...

    async def idle(self, follower: Follower) -> bytes:
        """What a tick without events writes (sse-starlette sends the pings)."""
        ...

    def handoff(self, follower: Follower) -> bytes:
        """This API process is stopping: tell the client to resume elsewhere (the stream goes on)."""
        ...

    def failed(self, follower: Follower, exc: TokenfanError | redis.RedisError) -> bytes:
        """Redis failed, lost the stream, or the client's resume point was past its end: end it with an
        error, never silence."""
        ...


class NativeSurface:
    """tokenfan's own events: `queued` while the stream waits, `reconnect` at the drain."""

    reconnects = True

    def __init__(self) -> None:
        self.writer = NativeWriter()

    def fresh(self, follower: Follower) -> bool:
        return follower.last == 0

    def write(self, batch: list[events.Event], follower: Follower) -> bytes:
        return self.writer.write(batch)

    async def idle(self, follower: Follower) -> bytes:
        if follower.state.status is StreamStatus.QUEUED:
            return await _queued_bytes(follower)
        return b""

    def handoff(self, follower: Follower) -> bytes:
        return sse.reconnect(follower.last)

    def failed(self, follower: Follower, exc: TokenfanError | redis.RedisError) -> bytes:
        code, message, retryable = _failure(exc)
        return sse.api_event(Error(follower.last, code, message, retryable))


class ChunkSurface:
    """OpenAI's chunks (chat.completion.chunk or text_completion, as `writer` makes them): they end in
    OpenAI's error object, then `[DONE]`."""

    reconnects = False

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def fresh(self, follower: Follower) -> bool:
        return follower.last == 0

    def write(self, batch: list[events.Event], follower: Follower) -> bytes:
        return self.writer.write(batch)

    async def idle(self, follower: Follower) -> bytes:
        return b""

    def handoff(self, follower: Follower) -> bytes:
        return openai_error("server_shutdown", "this API process is shutting down; resume with GET "
                            f"/v1/streams/{follower.sid}?format=openai and Last-Event-ID: {follower.last}")

    def failed(self, follower: Follower, exc: TokenfanError | redis.RedisError) -> bytes:
        code, message, _ = _failure(exc)
        return openai_error(code, message)


def _failure(exc: TokenfanError | redis.RedisError) -> tuple[str, str, bool]:
    """An error's code, message and whether it is retryable (as its class says: a bad id stays bad)."""
    if isinstance(exc, TokenfanError):
        return exc.code, exc.message, exc.retryable
    return "redis_unavailable", "Redis is unreachable; reconnect to resume", True


def sse_response(edge: Edge, body: AsyncIterator[bytes], sid: str) -> sse.SSEResponse:
    """A stream's response: sse-starlette pings and times out sends; our drain ends it (api/sse.py says why
    the library's own shutdown waits out the whole grace)."""
    s = edge.settings
    return sse.SSEResponse(body, ping_s=s.heartbeat_s, send_timeout_s=s.send_timeout_s, grace_s=s.shutdown_grace_s,
                           headers={"X-Tokenfan-Stream-Id": sid})


def _handing_off(edge: Edge, surface: Surface) -> bool:
    """Whether this process's streams of `surface` must end now (the module's docstring says when)."""
    return edge.closing.is_set() or (edge.draining and surface.reconnects)


async def relay(edge: Edge, follower: Follower, surface: Surface, *, t0: float) -> AsyncIterator[bytes]:
    """The body of every streaming response: one flushed write per batch of events.

    sse-starlette ends it on a disconnect or a send timeout: cancelled in an await, or closed at a
    `yield` (GeneratorExit). Either way the follower is closed here, not whenever the garbage
    collector gets to it, so the viewer is freed at once."""
    m = edge.metrics
    m.active.inc()
    first = surface.fresh(follower)
    try:
        async with aclosing(follower.batches()) as batches:
            async for batch in batches:
                data = b""
                if batch:
                    first = _observe(edge, batch, first, t0)
                    data = surface.write(batch, follower)
                    m.relayed.inc(len(batch))
                if _handing_off(edge, surface) and not follower.finished:
                    # follower.last already counts this batch: write it first, so the resume point
                    # named is the last event the client has, and no token falls between the two
                    follower.handed_off = True
                    yield data + surface.handoff(follower)
                    return
                if batch is None:  # an idle tick; sse-starlette sends the pings
                    data = await surface.idle(follower)
                if data:
                    yield data
    except (TokenfanError, redis.RedisError) as exc:
        follower.finished = True
        yield surface.failed(follower, exc)
    except (asyncio.CancelledError, GeneratorExit):
        m.disconnects.inc()
        raise
    finally:
        m.active.dec()
        if not follower.finished and not follower.handed_off:
            await follower.leave()


def _observe(edge: Edge, batch: list[events.Event], first: bool, t0: float) -> bool:
    """Relay lag per write, time to first token once; returns whether the first token is still ahead."""
    m = edge.metrics
    now = time.time()
    if batch:  # one observation per write: its oldest event, the worst lag in it
        m.relay_lag.observe(max(0.0, now - batch[0].ts))
    if first and any(isinstance(e, Token) for e in batch):
        m.first_token.observe(now - t0)
        return False
    return first


async def _queued_bytes(follower: Follower) -> bytes:
    return sse.api_event(Queued(follower.last, await follower.queue_position()))
