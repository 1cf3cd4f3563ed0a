"""Writing events to a client: tokenfan's named SSE events or OpenAI's chunks.

Both writers turn a batch of events into one bytes object, so events that
queued up for a slow client go out in one write (coalescing) while every
event keeps its own SSE frame and `id:`. The frames are api/sse.py's
(sse-starlette's encoding); the chunk JSON is made here, head first, once
per stream.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from tokenfan.api import sse
from tokenfan.api.errors import openai_error_body
from tokenfan.shared.events import Done, Error, Event, FinishReason, Meta, Token, ToolCallPiece


class Writer(Protocol):
    def write(self, batch: list[Event]) -> bytes: ...


class NativeWriter:
    def write(self, batch: list[Event]) -> bytes:
        return sse.event_frames(batch)


class ChunkWriter:
    """OpenAI's streamed formats: each event becomes its frames (the subclass says how for meta, token and
    done), an error event OpenAI's error object, anything else nothing."""

    def write(self, batch: list[Event]) -> bytes:
        return b"".join(self.one(e) for e in batch)

    def one(self, e: Event) -> bytes:
        if isinstance(e, Token):
            return self._token(e)
        if isinstance(e, Meta) and not e.resumed:
            return self._meta(e)
        if isinstance(e, Done):
            return self._done(e)
        if isinstance(e, Error):
            return openai_error(e.code, e.message, e.seq)
        return b""

    def _meta(self, e: Meta) -> bytes:
        return b""

    def _token(self, e: Token) -> bytes:
        raise NotImplementedError

    def _done(self, e: Done) -> bytes:
        raise NotImplementedError


class OpenAIWriter(ChunkWriter):
    """chat.completion.chunk frames; the stream id is the chunk id."""

    def __init__(self, stream_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.started = {0}  # choices whose role chunk went out (the first's with `meta`)
        self.ended: set[int] = set()  # choices whose finish chunk went out (n > 1)
        self.head = orjson.dumps(
            {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1] + b',"choices":['
        self.usage_head = orjson.dumps(
            {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1]

    def _choice(self, delta: dict[str, Any], finish: FinishReason | None, logprobs: Any = None, index: int = 0
                ) -> bytes:
        lp = None if logprobs is None else {"content": logprobs, "refusal": None}
        choice = orjson.dumps({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
        return self.head + choice + b"]}"

    def _meta(self, e: Meta) -> bytes:
        return sse.data_frame(self._choice({"role": "assistant", "content": ""}, None), e.seq)

    def _token(self, e: Token) -> bytes:
        """A piece of choice `index` (0 unless n > 1); a choice's own end (n > 1) is a token with no text
        and its finish reason."""
        index = e.choice
        out = b""
        if index not in self.started:  # a later choice's first chunk says its role, as the first's did
            self.started.add(index)
            out = sse.data_frame(self._choice({"role": "assistant", "content": ""}, None, index=index), e.seq)
        if e.finish_reason is not None:
            self.ended.add(index)
            return out + sse.data_frame(self._choice({}, e.finish_reason, index=index), e.seq)
        if e.tool_call is not None:
            delta = {"tool_calls": [tool_call_delta(e.tool_call)]}
            return out + sse.data_frame(self._choice(delta, None, index=index), e.seq)
        return out + sse.data_frame(self._choice({"content": e.text}, None, e.logprobs, index), e.seq)

    def _done(self, e: Done) -> bytes:
        if e.choices is not None:  # n > 1: the choices that did not end before the stream did
            out = b"".join(sse.data_frame(self._choice({}, c.finish_reason, index=c.index), e.seq)
                           for c in e.choices if c.index not in self.ended)
        else:
            out = sse.data_frame(self._choice({}, e.finish_reason), e.seq)
        if self.include_usage:
            usage = self.usage_head + b',"choices":[],"usage":' + orjson.dumps(openai_usage(e)) + b"}"
            out += sse.data_frame(usage, e.seq)
        return out + sse.DONE


def openai_usage(done: Done) -> dict[str, Any]:
    """A stream's usage as OpenAI's chat and legacy completions give it: the prompt tokens a slot's
    cache held are its `prompt_tokens_details.cached_tokens`."""
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def tool_call_delta(call: ToolCallPiece) -> dict[str, Any]:
    """One piece of a call as OpenAI streams it: index, and id, type and name in the call's first piece."""
    out: dict[str, Any] = {"index": call.index}
    if call.id is not None:
        out |= {"id": call.id, "type": "function", "function": {"name": call.name or "", "arguments": call.arguments}}
    else:
        out["function"] = {"arguments": call.arguments}
    return out


class Calls:
    """The calls of one choice, gathered from its events (a non-streamed answer)."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, call: ToolCallPiece) -> None:
        entry = self.calls.setdefault(call.index, {"id": "", "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
        if call.id is not None:
            entry["id"], entry["function"]["name"] = call.id, call.name or ""
        entry["function"]["arguments"] += call.arguments

    def list(self) -> list[dict[str, Any]]:
        return [self.calls[k] for k in sorted(self.calls)]


def openai_error(code: str | None, message: str, seq: int | None = None) -> bytes:
    """How an OpenAI-format stream ends in error: an `error` object (OpenAI clients raise it), then [DONE]."""
    return sse.data_frame(orjson.dumps(openai_error_body(message, "server_error", code)), seq) + sse.DONE


def completion(stream_id: str, model: str, created: int, text: str, done: Done,
               logprobs: list[Any] | None = None) -> dict[str, Any]:
    """The non-streaming answer, OpenAI's chat.completion; `logprobs` every token's, when asked for."""
    return completion_of(stream_id, model, created, {0: text}, done, {0: logprobs} if logprobs is not None else {})


def completion_of(stream_id: str, model: str, created: int, texts: dict[int, str], done: Done,
                  logprobs: dict[int, list[Any]], calls: dict[int, Calls] | None = None) -> dict[str, Any]:
    """chat.completion with a choice per index of `texts` (n > 1: the `done` event says each one's end);
    a choice that made calls has `tool_calls` (and `content` null when it wrote no text)."""
    calls = calls or {}
    return {
        "id": stream_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": i,
            "message": _message(texts[i], calls.get(i)),
            "logprobs": {"content": logprobs[i], "refusal": None} if i in logprobs else None,
            "finish_reason": done.finish_of(i),
        } for i in sorted(texts)],
        "usage": openai_usage(done),
        "tokenfan": {"timings": done.timings.wire()},
    }


def _message(text: str, calls: Calls | None) -> dict[str, Any]:
    if calls is None or not calls.calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls.list()}
