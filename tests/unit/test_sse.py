"""The API's SSE framing and response (api/sse.py): sse-starlette's encoding, byte for byte, on the
fast path too; no payload can forge an event; a stuck client ends alone, and its body is closed.
And the benchmark's client parses what the API writes as httpx-sse does, however it is cut."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import orjson
import pytest
from httpx_sse import EventSource
from hypothesis import given
from hypothesis import strategies as st
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.types import Message

from tests.procs import parse_sse
from tokenfan.api import sse
from tokenfan.bench.client import SSEParser
from tokenfan.shared import events
from tokenfan.shared.events import Event, Token, decode

# Generous bounds only, so a wedged response fails the test instead of hanging it; nothing is timed.
HANG_S = 20.0

kinds = st.sampled_from(sorted(events.TYPES))
# An event of each logged type with a piece of model (or any) text in it.
WITH_TEXT: dict[str, Callable[[int, str], Event]] = {
    events.META: lambda seq, text: events.Meta(seq, "s", text, "w", 1.0, False, ts=1.0),
    events.DISCLOSURE: lambda seq, text: events.Disclosure(seq, text, ts=1.0),
    events.TOKEN: lambda seq, text: events.Token(seq, text, ts=1.0),
    events.DONE: lambda seq, text: events.Done(seq, events.FinishReason.STOP, timings=events.Timings(worker=text),
                                               ts=1.0),
    events.ERROR: lambda seq, text: events.Error(seq, "engine_error", text, True, ts=1.0),
}


def _library(data: str, id: int | None = None, event: str | None = None) -> bytes:
    return ServerSentEvent(data, id=None if id is None else str(id), event=event, sep="\n").encode()


@given(st.text(), st.integers(min_value=1, max_value=2**53), kinds)
def test_event_frame_is_the_librarys_and_round_trips_any_model_text(text: str, seq: int, kind: str) -> None:
    e = WITH_TEXT[kind](seq, text)
    out = sse.event_frames([e])
    assert out == _library(e.encode().decode(), id=seq, event=kind)
    (got,) = parse_sse(out)
    assert (got.id, got.event) == (str(seq), kind)
    assert decode(got.data) == e


@given(st.lists(st.text(), min_size=1, max_size=8))
def test_a_batch_is_one_write_of_one_frame_per_event(texts: list[str]) -> None:
    batch = [Token(i + 1, t, ts=1.0) for i, t in enumerate(texts)]
    got = parse_sse(sse.event_frames(batch))
    assert [(g.id, g.event) for g in got] == [(str(e.seq), "token") for e in batch]
    assert [orjson.loads(g.data)["text"] for g in got] == texts


def test_a_payload_with_line_breaks_is_split_into_data_lines_not_new_events() -> None:
    # Valid JSON from elsewhere than orjson may hold raw newlines between tokens.
    forged = decode(b'{"seq": 2,\n"type": "token",\r\n"text": "x"}')
    plain = Token(3, "y", ts=1.0)
    out = sse.event_frames([forged, plain])
    assert out == _library(forged.encode().decode(), 2, "token") + _library(plain.encode().decode(), 3, "token")
    got = parse_sse(out)
    assert [(g.id, g.event) for g in got] == [("2", "token"), ("3", "token")]
    assert orjson.loads(got[0].data) == {"seq": 2, "type": "token", "text": "x"}


@given(st.binary(min_size=1).map(lambda b: b.decode("latin-1").encode()), st.one_of(st.none(), st.integers(0, 2**53)))
def test_data_frame_is_the_librarys(data: bytes, seq: int | None) -> None:
    assert sse.data_frame(data, seq) == _library(data.decode(), id=seq)
    (got,) = parse_sse(sse.data_frame(data, seq))
    assert got.data == data.decode().replace("\r\n", "\n").replace("\r", "\n")


@given(st.lists(st.text(), min_size=1, max_size=6), st.data())
def test_the_bench_parser_reads_the_same_events_however_the_bytes_are_split(texts: list[str], data: st.DataObject
                                                                             ) -> None:
    batch = [Token(i + 1, t, ts=1.0) for i, t in enumerate(texts)]
    raw = sse.event_frames(batch) + sse.PING_BYTES + sse.data_frame(b"[DONE]")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    parser = SSEParser()
    got = [ev for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True) for ev in parser.feed(raw[a:b])]
    assert [(e.id, e.event, e.data) for e in got] == [(e.id, e.event, e.data) for e in parse_sse(raw)]
    assert len(got) == len(texts) + 1


def test_a_ping_between_events_is_no_event_to_any_parser() -> None:
    # Issue 26: `: ping\n\n` after an `id:` made httpx-sse and openai-python's decoder dispatch an empty
    # event (the SDK then failed on its JSON). Read with no filter: every event has data, none is lost.
    batch = [Token(i + 1, str(i), ts=1.0) for i in range(3)]
    raw = (sse.PING_BYTES + sse.event_frames(batch[:1]) + sse.PING_BYTES + sse.PING_BYTES
           + sse.event_frames(batch[1:]) + sse.PING_BYTES + sse.DONE + sse.PING_BYTES)
    resp = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    got = list(EventSource(resp).iter_sse())
    assert [(e.id, e.data) for e in got] == [*((str(e.seq), e.encode().decode()) for e in batch), ("3", "[DONE]")]


def test_api_events_ping_and_done() -> None:
    assert sse.PING_BYTES == b": ping\n"  # no blank line: no parser dispatches an event for it
    assert sse.DONE == b"data: [DONE]\n\n"
    (q,) = parse_sse(sse.api_event(events.Queued(4, 2)))
    assert (q.id, q.event, q.json()) == ("4", "queued", {"type": "queued", "position": 2})
    (r,) = parse_sse(sse.reconnect(7))
    assert (r.id, r.event, r.retry) == ("7", "reconnect", 250)
    assert r.json() == {"type": "reconnect", "reason": "server_shutdown", "last_event_id": 7}


def test_the_stream_override_overrides_the_librarys_methods() -> None:
    # If sse-starlette renames them, ours would silently stop applying (every write timed again),
    # or the pings would no longer be timed by the method the library's `_ping` calls; and the
    # state our `__call__` keeps for the library's closing logic must be the library's.
    assert "_stream_response" in vars(EventSourceResponse)
    assert "_stream_response" in vars(sse.SSEResponse)
    assert "_send_with_timeout" in vars(EventSourceResponse)
    assert "_send_with_timeout" not in vars(sse.SSEResponse)
    assert callable(EventSourceResponse._listen_for_exit_signal)
    probe = EventSourceResponse(iter(()))
    for flag in ("_response_started", "_response_complete", "_client_disconnected", "_send_interrupted"):
        assert getattr(probe, flag) is False, flag


# --- the response, driven as uvicorn would, with a client that stops reading -------------------

class Client:
    """An ASGI peer: takes in `accept` body messages, then blocks every send for ever (a paused transport)."""

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.bodies: list[bytes] = []
        self.gone = anyio.Event()
        self._more = anyio.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            if len(self.bodies) >= self.accept:
                await anyio.sleep_forever()
            self.bodies.append(message.get("body", b""))
            self._more.set()

    async def took(self, n: int) -> None:
        """Until `n` body messages came in."""
        while len(self.bodies) < n:
            self._more = anyio.Event()
            await self._more.wait()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/v1/streams/x", "headers": [], "asgi": {"spec_version": "2.3"}}


def _body(n: int | None, closed: list[str], wait: anyio.Event | None = None, pace_s: float = 0.0
          ) -> AsyncIterator[bytes]:
    """`n` frames (None: for ever), each after `pace_s`, or after `wait` is set; notes when it is closed."""
    async def gen() -> AsyncIterator[bytes]:
        try:
            i = 0
            while n is None or i < n:
                i += 1
                yield sse.data_frame(b"%d" % i, i)
                if wait is not None:
                    await wait.wait()
                else:
                    await anyio.sleep(pace_s)
        finally:
            closed.append("closed")
    return gen()


def _response(body: AsyncIterator[bytes]) -> sse.SSEResponse:
    return sse.SSEResponse(body, ping_s=0.05, send_timeout_s=0.2)


@pytest.mark.parametrize("where", ["blocked in a send", "waiting for events"])
async def test_a_stuck_client_is_ended_by_the_pings_send_timeout_and_its_body_closed(
        where: str, caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []
    never = anyio.Event()
    body = _body(None, closed) if where == "blocked in a send" else _body(None, closed, wait=never)
    client = Client(accept=1)
    with anyio.fail_after(HANG_S), caplog.at_level(logging.WARNING, logger="tokenfan.api.sse"):
        await _response(body)(_scope(), client.receive, client.send)
    assert closed == ["closed"]
    assert "took in nothing" in caplog.text


async def test_a_stuck_client_does_not_hold_up_another() -> None:
    stuck_closed: list[str] = []
    ok_closed: list[str] = []
    stuck, ok = Client(accept=1), Client(accept=10**9)
    with anyio.fail_after(HANG_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_response(_body(None, ok_closed, pace_s=0.01)), _scope(), ok.receive, ok.send)
            await _response(_body(None, stuck_closed))(_scope(), stuck.receive, stuck.send)
            assert stuck_closed == ["closed"] and ok_closed == []
            after = len(ok.bodies)
            await ok.took(after + 3)  # the healthy one goes on
            ok.gone.set()
    assert ok_closed == ["closed"]


async def test_a_disconnect_closes_the_body() -> None:
    closed: list[str] = []
    client = Client(accept=10**9)
    never = anyio.Event()

    async def leave() -> None:
        await client.took(2)
        client.gone.set()

    with anyio.fail_after(HANG_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave)
            await _response(_body(None, closed, wait=never))(_scope(), client.receive, client.send)
    assert closed == ["closed"]


async def test_a_finished_body_completes_the_response_with_pings_between() -> None:
    closed: list[str] = []
    client = Client(accept=10**9)
    with anyio.fail_after(HANG_S):
        await _response(_body(3, closed))(_scope(), client.receive, client.send)
    frames = [b for b in client.bodies if b and b != sse.PING_BYTES]
    assert frames == [sse.data_frame(b"%d" % i, i) for i in (1, 2, 3)]
    assert client.bodies[-1] == b"" and closed == ["closed"]


async def test_an_idle_stream_runs_one_task_of_its_own() -> None:
    # The library runs four a response (the body, pings, disconnect, exit signal); ours runs the body
    # in one and the rest in the request's own task: what an idle stream costs in memory.
    closed: list[str] = []
    never = anyio.Event()
    clients = [Client(accept=10**9) for _ in range(4)]
    with anyio.fail_after(HANG_S):
        async with anyio.create_task_group() as tg:
            counts = []
            for group in (clients[:1], clients[1:]):  # the first also starts the process's shutdown watch
                for c in group:
                    tg.start_soon(_response(_body(None, closed, wait=never)), _scope(), c.receive, c.send)
                for c in group:
                    await c.took(1)
                counts.append(len(asyncio.all_tasks()))
            assert counts[1] - counts[0] == 2 * 3  # each: the request's own task and the body's
            for c in clients:
                c.gone.set()
    assert closed == ["closed"] * 4


async def test_server_shutdown_sets_the_event_waits_the_grace_and_ends_every_stream() -> None:
    # One watcher for the process (the library's exit signal), not one a response: a stream that
    # ends itself within its grace completes; one that does not is cancelled when its grace is out.
    closed_polite: list[str] = []
    closed_stubborn: list[str] = []
    polite_stop, stubborn_stop = anyio.Event(), anyio.Event()
    never = anyio.Event()

    async def polite() -> AsyncIterator[bytes]:
        try:
            yield sse.data_frame(b"1", 1)
            await polite_stop.wait()
            yield sse.data_frame(b"bye", 2)
        finally:
            closed_polite.append("closed")

    a, b = Client(accept=10**9), Client(accept=10**9)
    r_polite = sse.SSEResponse(polite(), ping_s=0.05, send_timeout_s=1.0, grace_s=HANG_S, shutdown_event=polite_stop)
    r_stubborn = sse.SSEResponse(_body(None, closed_stubborn, wait=never), ping_s=0.05, send_timeout_s=1.0,
                                 grace_s=0.2, shutdown_event=stubborn_stop)
    try:
        with anyio.fail_after(HANG_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(r_polite, _scope(), a.receive, a.send)
                tg.start_soon(r_stubborn, _scope(), b.receive, b.send)
                await a.took(1)
                await b.took(1)
                AppStatus.should_exit = True
            # A stream that starts after the shutdown fired is ended too.
            late: list[str] = []
            c = Client(accept=10**9)
            await sse.SSEResponse(_body(None, late, wait=never), ping_s=0.05, send_timeout_s=1.0)(
                _scope(), c.receive, c.send)
    finally:
        AppStatus.should_exit = False
    assert polite_stop.is_set() and stubborn_stop.is_set()
    assert closed_polite == closed_stubborn == late == ["closed"]
    assert sse.data_frame(b"bye", 2) in a.bodies and a.bodies[-1] == b""
    # The stubborn one was cut short: still ended with the closing empty body, as the library does.
    assert b.bodies[-1] == b"" and c.bodies[-1] == b""
