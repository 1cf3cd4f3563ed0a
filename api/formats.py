"""Writing events to a client: tokenfan's named SSE events or OpenAI's chunks.

Both writers turn a batch of events into one bytes object, so events that
queued up for a slow client go out in one write (coalescing) while every
event keeps its own SSE frame and `id:`. The frames are api/sse.py's
(sse-starlette's encoding); the chunk JSON is made here, head first, once
per stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from tokenfan.api import sse
from tokenfan.shared import events
from tokenfan.shared.events import Event


class NativeWriter:
    def write(self, batch: list[Event]) -> bytes:
        return sse.event_frames(batch)


class OpenAIWriter:
    """chat.completion.chunk frames; the stream id is the chunk id."""

    def __init__(self, stream_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.head = orjson.dumps(
            {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1] + b',"choices":['
        self.usage_head = orjson.dumps(
            {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1]

    def _choice(self, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> bytes:
        lp = None if logprobs is None else {"content": logprobs, "refusal": None}
        choice = orjson.dumps({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
        return self.head + choice + b"]}"

    def write(self, batch: list[Event]) -> bytes:
        return b"".join(self.one(e) for e in batch)

    def one(self, e: Event) -> bytes:
        if e.type == events.TOKEN:
            delta = {"content": e.data.get("text", "")}
            return sse.data_frame(self._choice(delta, None, e.data.get("logprobs")), e.seq)
        if e.type == events.META and not e.data.get("resumed"):
            return sse.data_frame(self._choice({"role": "assistant", "content": ""}, None), e.seq)
        if e.type == events.DONE:
            return self._done(e)
        if e.type == events.ERROR:
            return openai_error(e.data.get("code"), e.data.get("message", ""), e.seq)
        return b""

    def _done(self, e: Event) -> bytes:
        out = sse.data_frame(self._choice({}, e.data.get("finish_reason", "stop")), e.seq)
        if self.include_usage:
            usage = self.usage_head + b',"choices":[],"usage":' + orjson.dumps(e.data.get("usage")) + b"}"
            out += sse.data_frame(usage, e.seq)
        return out + sse.DONE


def openai_error(code: str | None, message: str, seq: int | None = None) -> bytes:
    """How an OpenAI-format stream ends in error: an `error` object (OpenAI clients raise it), then [DONE]."""
    err = {"error": {"message": message, "type": "server_error", "code": code, "param": None}}
    return sse.data_frame(orjson.dumps(err), seq) + sse.DONE


def completion(stream_id: str, model: str, created: int, text: str, done: Event,
               logprobs: list[Any] | None = None) -> dict[str, Any]:
    """The non-streaming answer, OpenAI's chat.completion; `logprobs` every token's, when asked for."""
    return {
        "id": stream_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": done.data.get("finish_reason", "stop"),
        }],
        "usage": done.data.get("usage"),
        "tokenfan": {"timings": done.data.get("timings")},
    }
