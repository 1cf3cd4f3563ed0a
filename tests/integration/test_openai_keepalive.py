"""Streams many keep-alive intervals long (issue 26) through the official clients on every route: the
Python SDK (chat.completions, completions, responses), the Node SDK (the same three), httpx-sse on the
native route with a resume by Last-Event-ID. Real API and worker processes, the fake engine paced slow
and pings every 50 ms, so each stream carries pings after its first `id:` (the bytes are checked)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import EventSource

from tests import nodesdk
from tests.procs import Cluster, Proc, assert_whole, create_stream, expected_text, logged, read_stream, token_text

HEARTBEAT_S = "0.05"
RATE = "25"  # tokens a second: a stream of TOKENS lasts about 40 heartbeats
TOKENS = 48
PROMPT = "tell me a long story"
PING = b": ping\n"


@pytest.fixture
def api(cluster: Cluster) -> Proc:
    proc = cluster.api(TOKENFAN_HEARTBEAT_S=HEARTBEAT_S)
    cluster.worker(TOKENFAN_FAKE_RATE=RATE, TOKENFAN_SLOTS="2")
    return proc


@dataclass
class Tee(httpx.BaseTransport):
    """A transport that keeps every byte of the responses it reads, as the client got them."""

    inner: httpx.HTTPTransport = field(default_factory=httpx.HTTPTransport)
    seen: bytearray = field(default_factory=bytearray)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        return httpx.Response(resp.status_code, headers=resp.headers, stream=_Kept(resp.stream, self.seen),
                              extensions=resp.extensions)


@dataclass
class _Kept(httpx.SyncByteStream):
    inner: Any
    seen: bytearray

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.seen += chunk
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _pinged_after_an_id(raw: bytes) -> None:
    """The case that broke the SDKs: a keep-alive after an event with an `id:`."""
    first_id = raw.find(b"id: ")
    assert first_id >= 0 and raw.find(PING, first_id) > first_id, raw[:400]
    assert PING + b"\n" not in raw  # never a blank line after a ping: that is an event to some parsers


@pytest.fixture
def tee() -> Tee:
    return Tee()


@pytest.fixture
def client(api: Proc, tee: Tee) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=60,
                      http_client=httpx.Client(transport=tee, timeout=60))
    yield c
    c.close()


def test_python_sdk_chat_completions_across_many_pings(client: openai.OpenAI, tee: Tee) -> None:
    chunks = list(client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=TOKENS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(PROMPT, TOKENS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    _pinged_after_an_id(bytes(tee.seen))


def test_python_sdk_completions_across_many_pings(client: openai.OpenAI, tee: Tee) -> None:
    chunks = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(PROMPT, TOKENS)
    _pinged_after_an_id(bytes(tee.seen))


def test_python_sdk_responses_across_many_pings(client: openai.OpenAI, tee: Tee) -> None:
    evs = list(client.responses.create(model="smollm2", input=PROMPT, max_output_tokens=TOKENS, stream=True))
    assert "".join(e.delta for e in evs if e.type == "response.output_text.delta") == expected_text(PROMPT, TOKENS)
    assert evs[-1].type == "response.incomplete" and evs[-1].response.output_text == expected_text(PROMPT, TOKENS)
    _pinged_after_an_id(bytes(tee.seen))


def test_node_sdk_every_route_across_many_pings(api: Proc) -> None:
    got = nodesdk.run("sdk_streams.cjs", api.url, PROMPT, str(TOKENS), "chat,completions,responses")
    want = expected_text(PROMPT, TOKENS)
    assert got["chat"]["text"] == want and got["chat"]["chunks"] > TOKENS
    assert got["completions"]["text"] == want
    assert got["responses"]["text"] == want and got["responses"]["types"][-1] == "response.incomplete"


def test_native_stream_pings_are_no_events_and_last_event_id_resumes(api: Proc) -> None:
    sid = create_stream(api.url, content=PROMPT, max_tokens=TOKENS)
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=60) as resp:
        raw = b""
        for chunk in resp.iter_bytes():
            raw += chunk
            if raw.count(b"event: token") >= 10 and raw.find(PING, raw.find(b"id: ")) > 0:
                break
    # Every event httpx-sse reads, unfiltered, has data: a ping is none of them.
    first = list(EventSource(httpx.Response(200, headers={"content-type": "text/event-stream"},
                                            content=raw)).iter_sse())
    assert first and all(e.data for e in first)
    _pinged_after_an_id(raw)
    last = int(logged(first)[-1].id)
    status, rest = read_stream(api.url, sid, last=last)
    assert status == 200
    whole = logged(first) + logged(rest)
    assert_whole(whole)
    assert token_text(whole) == expected_text(PROMPT, TOKENS)


def test_python_sdk_responses_resume_with_starting_after_across_pings(client: openai.OpenAI, tee: Tee) -> None:
    stream = client.responses.create(model="smollm2", input=PROMPT, max_output_tokens=TOKENS, stream=True,
                                     background=True)
    got = []
    for ev in stream:
        got.append(ev)
        if sum(e.type == "response.output_text.delta" for e in got) >= 10:
            break
    stream.close()
    rest = list(client.responses.retrieve(got[0].response.id, stream=True, starting_after=got[-1].sequence_number))
    whole = got + rest
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    assert "".join(e.delta for e in whole if e.type == "response.output_text.delta") == expected_text(PROMPT, TOKENS)
    _pinged_after_an_id(bytes(tee.seen))
