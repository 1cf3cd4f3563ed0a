"""Server-Sent Events on the API's side: sse-starlette's framer and response.

Every frame the API writes is what sse-starlette's `ServerSentEvent.encode()`
makes of it with LF line ends, and every SSE response is an
`EventSourceResponse` (its pings, disconnect detection, send timeout and
shutdown handling). What the relay adds on top is speed, and the drain.

Deliberate departures from the obvious:
- the relay's frames (an `id:`, an `event:`, one line of JSON) are filled
  into a bytes template instead of building a `ServerSentEvent` per token:
  the library's `encode()` (a StringIO, a regex split per field) costs about
  7x the template (5-6 against 0.7-0.8 µs of CPU an event, measured), a
  quarter of a CPU at 50,000 events/s. The template is used only where it
  is byte for byte the library's output (one line of data;
  tests/unit/test_sse.py checks it with hypothesis); a payload with a CR or
  LF in it goes through `ServerSentEvent`, which splits it into `data:`
  lines, so no payload can end its event early and start another. Event
  JSON (orjson) never holds one: the check is the guard, not the path. A
  batch of one event, the usual write, is checked on its payload; a longer
  one on the whole write, in one scan.
- a batch that queued up for a slow client is framed into one bytes object
  and passed through: `EventSourceResponse` sends bytes untouched, one
  ASGI message (one flushed write) per batch, each event its own frame.
- `SSEResponse` times only the pings, not every write (its `_stream_response`
  is the library's loop without the per-write timer, `ensure_bytes` and debug
  log call: four Python calls an event fewer, of about 90): sse-starlette wraps
  each send in an anyio cancel scope, about 15 µs of CPU a write measured
  (1.1 µs without it; Starlette's StreamingResponse, used before, 0.7), most
  of what the relay spends per event. A client that takes in nothing stops
  taking the pings too (a paused transport blocks every send), so the
  ping's send timeout still ends it, within `heartbeat_s + send_timeout_s`,
  through sse-starlette's own teardown: the body iterator is closed and its
  `finally` frees the viewer. That one client's task group ends; nobody
  else's is touched.
- one task a response, not four: the library's `__call__` runs the body, the
  pings, the disconnect listener and the exit-signal listener each in a task
  of its own (25 KiB an idle stream, measured with tracemalloc; 10 KiB ours).
  Ours runs the body in one task; the request's own task waits for the
  client's next message at most a ping interval and pings when none came
  (the library's `_listen_for_disconnect` and `_ping` in one loop); and one
  watcher a process (the library's `_listen_for_exit_signal`) ends every open
  response at shutdown with the library's `shutdown_event` and grace. The
  pings are still timed by its `_send_with_timeout`, and a stream the shutdown
  cut short still gets the closing empty body, as the library ends it.
- a ping is a comment line with no blank line after it (`: ping\n`), not a
  comment event: see `PING_BYTES` (issue 26: a blank line after an `id:`
  is an empty event to the OpenAI SDK's parser).
- pings go every `heartbeat_s` seconds whatever else was sent (the
  library's timer), not after `heartbeat_s` of silence: one comment per
  stream per interval costs nothing, and the timer is what times sends.
- shutdown: importing sse-starlette patches uvicorn's `handle_exit`, and
  about 0.5 s after SIGTERM it would cancel every open response; our own
  drain (`Edge.drain`, started from ops/serve.py) tells native clients to
  reconnect at once and lets OpenAI-format streams run until just before
  the grace ends. The streams' `shutdown_grace_period` is therefore the
  whole `shutdown_grace_s`: the library cancels only what the drain and
  uvicorn's own deadline (the same length) left, never earlier. The ops
  feed has no drain of its own and uses the library's `shutdown_event` to
  end at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import AsyncIterable, Mapping, Sequence

import anyio
from anyio.abc import TaskGroup
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette._utils import collapse_excgroups
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from tokenfan.shared.defaults import RECONNECT_RETRY_MS
from tokenfan.shared.events import Event, Reconnect

log = logging.getLogger(__name__)

# LF, not the library's CRLF: every SSE parser accepts both, and LF is a byte less per line.
SEP = "\n"
PING = ServerSentEvent(comment="ping", sep=SEP)
# The keep-alive is the library's comment line without the blank line that would end an event
# (`: ping\n`, not `: ping\n\n`): once an `id:` was seen, openai-python's SSEDecoder and httpx-sse
# (florimondmanca/httpx-sse#35) dispatch a blank line as an event with empty data, which the SDK
# parses as JSON (JSONDecodeError at the first ping, 15 s into any stream; issue 26). A comment
# line with no blank line folds into the next event's block, where every parser (the spec's,
# EventSource's, openai-python's, openai-node's, httpx-sse's) skips it: no parser dispatches
# anything for it, and the bytes still reach proxies every interval. Frames are whole ASGI
# messages, so a ping always lands between two events, never inside one.
PING_BYTES = PING.encode().removesuffix(SEP.encode())

# `id: {seq}` `event: {type}` `data: {one line of JSON}`: ServerSentEvent(data, id=, event=).encode()
# for data without a line break (every newline of a frame is one of these four).
_EVENT_FRAME = b"id: %d\nevent: %s\ndata: %s\n\n"
_EVENT_FRAME_LINES = 4


def frame(data: bytes | str | None = None, *, id: int | None = None, event: str | None = None,
          retry: int | None = None, comment: str | None = None) -> bytes:
    """One SSE event, encoded by sse-starlette: the framer for anything not on the hot path."""
    text = data.decode() if isinstance(data, bytes) else data
    return ServerSentEvent(text, id=None if id is None else str(id), event=event, retry=retry, comment=comment,
                           sep=SEP).encode()


def data_frame(data: bytes, id: int | None = None) -> bytes:
    """`id:` and one `data:` line (an OpenAI chunk, `[DONE]`): `frame(data, id=id)`, without its cost."""
    if b"\n" in data or b"\r" in data:
        return frame(data, id=id)
    if id is None:
        return b"data: %s\n\n" % data
    return b"id: %d\ndata: %s\n\n" % (id, data)


def event_frames(batch: Sequence[Event]) -> bytes:
    """The events of one batch, each its own frame, in one bytes object: the relay's hot path."""
    if len(batch) == 1:  # the usual write: a client that keeps up gets its events one by one
        e = batch[0]
        raw = e.encode()
        if b"\n" in raw or b"\r" in raw:
            return frame(raw, id=e.seq, event=e.type)
        return _EVENT_FRAME % (e.seq, e.type.encode(), raw)
    out = b"".join([_EVENT_FRAME % (e.seq, e.type.encode(), e.encode()) for e in batch])
    # One scan of the whole write instead of two per event: any line break in a
    # payload (or a type) shows as a newline too many, or as a CR.
    if out.count(b"\n") != _EVENT_FRAME_LINES * len(batch) or b"\r" in out:
        return b"".join(frame(e.encode(), id=e.seq, event=e.type) for e in batch)
    return out


def api_event(e: Event, retry: int | None = None) -> bytes:
    """An event the API makes (`queued`, `reconnect`, a local `error`): not logged, so its seq is
    the last seq sent, its id, and a client resuming from it misses nothing."""
    return frame(e.api_encode(), id=e.seq, event=e.type, retry=retry)


def reconnect(last_id: int) -> bytes:
    """This API process is stopping: resume from `last_id` on another replica, soon (the stream goes on)."""
    return api_event(Reconnect(last_id), retry=RECONNECT_RETRY_MS)


DONE = data_frame(b"[DONE]")


def _ping() -> ServerSentEvent:
    return PING


class SSEResponse(EventSourceResponse):
    """sse-starlette's response with LF frames, our ping, a send timeout that costs the writes nothing,
    and one task a response instead of four (see the module's docstring)."""

    def __init__(self, content: AsyncIterable[bytes], *, ping_s: float, send_timeout_s: float | None,
                 grace_s: float = 0.0, headers: Mapping[str, str] | None = None,
                 shutdown_event: anyio.Event | None = None) -> None:
        super().__init__(content, headers=headers, ping=ping_s, sep=SEP, ping_message_factory=_ping,
                         send_timeout=send_timeout_s, shutdown_grace_period=grace_s, shutdown_event=shutdown_event)
        self._group: TaskGroup | None = None

    async def _stream_response(self, send: Send) -> None:
        """sse-starlette's own loop, less what it costs per write and we do not need: our chunks are
        bytes already (no `ensure_bytes`), untimed (see the module's docstring; the library's
        `_send_with_timeout` still times the pings), and not logged at debug level (a call per event
        even when the level is off). On a failed send the body iterator is closed, as the library does."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self._response_started = True
        async for chunk in self.body_iterator:
            try:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except BaseException:
                self._send_interrupted = True
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with anyio.move_on_after(self._cleanup_timeout, shield=True):
                        await aclose()
                raise
        async with self._send_lock:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except BaseException:
                self._send_interrupted = True
                raise
            self._response_complete = True
            self.active = False

    async def _watch(self, receive: Receive, send: Send) -> None:
        """The library's `_listen_for_disconnect` and `_ping` in one loop, run by the request's own task:
        wait for the client's next message at most a ping interval, and ping when none came."""
        interval = self._ping_interval or math.inf
        while self.active:
            with anyio.move_on_after(interval) as waited:
                message = await receive()
            if not waited.cancelled_caught:
                # A cancelled receive loses nothing: uvicorn's message stays for the next one.
                if message["type"] == "http.disconnect":
                    self.active = False
                    self._client_disconnected = True
                    if self.client_close_handler_callable:
                        await self.client_close_handler_callable(message)
                    return
                continue
            async with self._send_lock:
                if self.active:
                    # A timeout here raises out of the task group, which cancels `_stream_response`
                    # where it waits for the body's next chunk: the body's `finally` runs.
                    await self._send_with_timeout(
                        send, {"type": "http.response.body", "body": PING_BYTES, "more_body": True})

    async def _stream_then_end(self, send: Send) -> None:
        await self._stream_response(send)
        self._end()

    def _end(self) -> None:
        if self._group is not None:
            self._group.cancel_scope.cancel()

    def _shut_down(self) -> None:
        """The server is stopping: the library's `shutdown_event` and grace, then the end."""
        if self._group is not None:
            self._group.start_soon(self._grace_then_end)

    async def _grace_then_end(self) -> None:
        if self._shutdown_event is not None:
            self._shutdown_event.set()
        # A stream that ends within the grace ends the group, this task with it.
        await anyio.sleep(self._shutdown_grace_period)
        self._end()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"].upper() == "HEAD":
            await super().__call__(scope, receive, send)  # the library's own answers: no stream
            return
        shutdown = _Shutdown.of_this_loop()
        try:
            with collapse_excgroups():
                async with anyio.create_task_group() as group:
                    self._group = group
                    shutdown.add(self)
                    group.start_soon(self._stream_then_end, send)
                    await self._watch(receive, send)
                    self._end()
        except SendTimeoutError:
            # The body iterator is closed already; uvicorn closes the connection (it says the
            # response was not completed: it cannot be, the client takes nothing in).
            log.warning("API: a client of %s took in nothing for %.0f s; its connection is closed",
                        scope.get("path", "?"), self.send_timeout or 0.0)
            return
        finally:
            shutdown.discard(self)
            self._group = None
        # As the library ends a stream the shutdown cut short: with the closing empty body.
        if (self._response_started and not self._response_complete and not self._client_disconnected
                and not self._send_interrupted):
            try:
                await self._send_with_timeout(send, {"type": "http.response.body", "body": b"", "more_body": False})
                self._response_complete = True
            except OSError:
                pass
        if self.background is not None:
            await self.background()


class _Shutdown:
    """The open responses of one event loop, and one task that ends them all when the server stops
    (the library's `_listen_for_exit_signal`, which it runs once a response)."""

    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shutdown] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.responses: set[SSEResponse] = set()
        self.fired = False
        self.task = asyncio.get_running_loop().create_task(self._wait())

    @classmethod
    def of_this_loop(cls) -> _Shutdown:
        loop = asyncio.get_running_loop()
        found = cls._loops.get(loop)
        if found is None or (found.task.done() and not found.fired):
            found = cls._loops[loop] = cls()
        return found

    def add(self, response: SSEResponse) -> None:
        self.responses.add(response)
        if self.fired:
            response._shut_down()

    def discard(self, response: SSEResponse) -> None:
        self.responses.discard(response)

    async def _wait(self) -> None:
        await EventSourceResponse._listen_for_exit_signal()
        self.fired = True
        for response in list(self.responses):
            response._shut_down()
