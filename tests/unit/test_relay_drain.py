"""The relay's drain: the resume point it names is the last event the client was sent.

The follower counts a batch as read (`last`) before the relay writes it; a drain that noticed
SIGTERM on that batch once dropped it and named its last seq, so the client resumed past tokens
it never had. Here the drain starts while a batch is in flight, in both formats."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import orjson

from tests.procs import parse_sse
from tokenfan.api.formats import OpenAIWriter
from tokenfan.api.metrics import ApiMetrics
from tokenfan.api.relay import ChunkSurface, NativeSurface, relay
from tokenfan.shared import events
from tokenfan.shared.events import Event, Token
from tokenfan.shared.state import StreamStatus


class _Follower:
    """Stands in for api/streams.py's Follower: counts each batch as read before yielding it."""

    def __init__(self, edge: Any, batches: list[list[Event]], drain_before: int) -> None:
        self.edge, self._batches, self._drain_before = edge, batches, drain_before
        self.sid, self.last, self.finished, self.handed_off = "sid", 0, False, False
        self.state = SimpleNamespace(status=StreamStatus.RUNNING)
        self.left = False

    async def batches(self) -> AsyncGenerator[list[Event] | None, None]:
        for i, batch in enumerate(self._batches):
            if i == self._drain_before:
                self.edge.draining = True
                self.edge.closing.set()
            self.last = batch[-1].seq
            yield batch

    async def leave(self) -> None:
        self.left = True


def _tokens(first: int, n: int) -> list[Event]:
    return [Token(seq, f"t{seq} ", ts=0.0) for seq in range(first, first + n)]


async def _run(native: bool) -> tuple[bytes, _Follower]:
    edge = SimpleNamespace(metrics=ApiMetrics(), draining=False, closing=asyncio.Event())
    follower = _Follower(edge, [_tokens(1, 2), _tokens(3, 3), _tokens(6, 2)], drain_before=1)
    surface = NativeSurface() if native else ChunkSurface(OpenAIWriter("sid", "m", 1, include_usage=False))
    out = b"".join([chunk async for chunk in relay(edge, follower, surface, t0=0.0)])  # type: ignore[arg-type]
    return out, follower


def test_an_openai_drain_names_the_last_token_it_wrote() -> None:
    out, follower = asyncio.run(_run(native=False))
    frames = parse_sse(out)
    assert frames[-1].data == "[DONE]"
    texts = [orjson.loads(f.data)["choices"][0]["delta"]["content"] for f in frames[:-2]]
    assert texts == [f"t{seq} " for seq in range(1, 6)]  # the batch in flight was written, not dropped
    message = orjson.loads(frames[-2].data)["error"]["message"]
    found = re.search(r"Last-Event-ID: (\d+)", message)
    assert found is not None and int(found.group(1)) == 5
    assert follower.handed_off and not follower.left


def test_a_native_drain_reconnects_from_the_last_event_it_wrote() -> None:
    out, _ = asyncio.run(_run(native=True))
    frames = parse_sse(out)
    assert [f.id for f in frames if f.event == events.TOKEN] == [str(seq) for seq in range(1, 6)]
    assert frames[-1].event == "reconnect" and orjson.loads(frames[-1].data)["last_event_id"] == 5
