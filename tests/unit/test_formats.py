from __future__ import annotations

import orjson

from tests.procs import SSE, parse_sse
from tokenfan.api.completions import text_completion
from tokenfan.api.formats import NativeWriter, OpenAIWriter, completion
from tokenfan.api.responses.record import Record, View
from tokenfan.api.responses.render import response_object
from tokenfan.shared.events import Disclosure, Done, Error, Event, FinishReason, Meta, Token, Usage

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}


def _stream() -> list[Event]:
    return [
        Meta(1, "s", "m", "w", 1.0, False, ts=1.0),
        Disclosure(2, "AI", ts=1.0),
        Token(3, "Hel", ts=1.0),
        Token(4, "lo", ts=1.0),
        Done(5, FinishReason.STOP, Usage(3, 2), ts=1.0),
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
    err = Error(3, "engine_error", "boom", True, ts=1.0)
    out = _frames(OpenAIWriter("s", "m", 1, False).write([err]))
    assert orjson.loads(out[0].data)["error"]["code"] == "engine_error"
    assert out[1].data == "[DONE]"


def test_resumed_meta_does_not_repeat_the_role_chunk() -> None:
    meta = Meta(9, "s", "m", "w2", 1.0, True, ts=1.0)
    assert OpenAIWriter("s", "m", 1, False).write([meta]) == b""


def test_native_writer_coalesces_a_batch_into_one_write_of_separate_frames() -> None:
    out = _frames(NativeWriter().write(_stream()))
    assert [f.event for f in out] == ["meta", "disclosure", "token", "token", "done"]
    assert [f.id for f in out] == ["1", "2", "3", "4", "5"]


def test_non_streaming_completion() -> None:
    done = _stream()[-1]
    assert isinstance(done, Done)
    body = completion("s", "m", 5, "Hello", done)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["usage"] == USAGE


def test_the_prompt_tokens_a_slot_had_cached_are_openais_cached_tokens() -> None:
    done = Done(5, FinishReason.STOP, Usage(30, 2, cached_tokens=24), ts=1.0)
    stream = [*_stream()[:-1], done]
    chunks = [orjson.loads(f.data) for f in _frames(OpenAIWriter("s", "m", 1, True).write(stream))[:-1]]
    assert chunks[-1]["usage"] == {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32,
                                   "prompt_tokens_details": {"cached_tokens": 24}}
    assert completion("s", "m", 5, "Hello", done)["usage"] == chunks[-1]["usage"]
    legacy = text_completion("", logprobs=False)("s", "m", 5, {0: "Hello"}, done, {}, {})
    assert legacy["usage"] == chunks[-1]["usage"]
    view = View("s", Record(model="m", created_at=1.0, background=False, store=True, instructions=None, metadata={},
                            max_output_tokens=None, temperature=1.0, top_p=1.0, text_format={"type": "text"},
                            user=None))
    usage = response_object(view, "completed", [], done)["usage"]
    assert (usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]) == (30, 24)
