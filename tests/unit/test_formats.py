from __future__ import annotations

import orjson

from tests.procs import SSE, parse_sse
from tokenfan.api.formats import NativeWriter, OpenAIWriter, completion
from tokenfan.shared import events
from tokenfan.shared.events import Event

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def _stream() -> list[Event]:
    return [
        Event(1, events.META, {"stream_id": "s", "model": "m", "resumed": False}, ts=1.0),
        Event(2, events.DISCLOSURE, {"text": "AI"}, ts=1.0),
        Event(3, events.TOKEN, {"text": "Hel"}, ts=1.0),
        Event(4, events.TOKEN, {"text": "lo"}, ts=1.0),
        Event(5, events.DONE, {"finish_reason": "stop", "usage": USAGE}, ts=1.0),
    ]


def _frames(raw: bytes) -> list[SSE]:
    return parse_sse(raw)


def test_openai_chunks_follow_openai_shape() -> None:
    out = _frames(OpenAIWriter("sid123", "m", 1700000000, include_usage=True).write(_stream()))
    assert out[-1].data == "[DONE]"
    chunks = [orjson.loads(f.data) for f in out[:-1]]
    assert {c["id"] for c in chunks} == {"sid123"}
    assert {c["created"] for c in chunks} == {1700000000}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE
    assert [f.id for f in out[:-1]] == ["1", "3", "4", "5", "5"]


def test_openai_without_usage_has_no_usage_chunk() -> None:
    out = _frames(OpenAIWriter("s", "m", 1, include_usage=False).write(_stream()))
    chunks = [orjson.loads(f.data) for f in out[:-1]]
    assert all(c["choices"] for c in chunks)


def test_openai_error_becomes_error_object_then_done() -> None:
    err = Event(3, events.ERROR, {"code": "engine_error", "message": "boom", "retryable": True}, ts=1.0)
    out = _frames(OpenAIWriter("s", "m", 1, False).write([err]))
    assert orjson.loads(out[0].data)["error"]["code"] == "engine_error"
    assert out[1].data == "[DONE]"


def test_resumed_meta_does_not_repeat_the_role_chunk() -> None:
    meta = Event(9, events.META, {"resumed": True}, ts=1.0)
    assert OpenAIWriter("s", "m", 1, False).write([meta]) == b""


def test_native_writer_coalesces_a_batch_into_one_write_of_separate_frames() -> None:
    out = _frames(NativeWriter().write(_stream()))
    assert [f.event for f in out] == ["meta", "disclosure", "token", "token", "done"]
    assert [f.id for f in out] == ["1", "2", "3", "4", "5"]


def test_non_streaming_completion() -> None:
    body = completion("s", "m", 5, "Hello", _stream()[-1])
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["usage"] == USAGE
