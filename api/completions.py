"""POST /v1/completions, OpenAI's legacy text route: the request, and its `text_completion` answer.

A text completion is a tokenfan stream like a chat (queued, batched, logged, resumable, bound to its
key) whose job carries the prompt as it is (`JobPayload.prompt`): the worker feeds it to the model
without the chat template, and it ends at the model's end-of-text, a `stop` string or `max_tokens`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import orjson
from pydantic import BaseModel, Field, ValidationError

from tokenfan.api import sse
from tokenfan.api.formats import Calls, ChunkWriter, openai_usage
from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.events import Done, FinishReason, Meta, Token
from tokenfan.shared.schema import MAX_N, Bool, ChatRequest, Int, Number, OpenAIRequest, StreamOptions, Text

# OpenAI's own: the default length of a text completion, and its cap on `logprobs`.
DEFAULT_MAX_TOKENS: Final = 16
MAX_LEGACY_LOGPROBS: Final = 5
# What the chat request calls what this route calls otherwise.
_PARAMS: Final = {"messages": "prompt", "top_logprobs": "logprobs"}


class CompletionRequest(OpenAIRequest):
    model: Text | None = None
    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    max_tokens: Int | None = Field(default=DEFAULT_MAX_TOKENS, gt=0)
    temperature: Number | None = None
    top_p: Number | None = None
    n: Int = Field(default=1, ge=1, le=MAX_N)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: Int | None = None
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: Bool = False
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: Text | None = None
    suffix: Text | None = None
    best_of: Int | None = Field(default=None, ge=1)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_chat(self) -> ChatRequest:
        """The stream this completion runs as (400 naming this route's parameter when it cannot)."""
        if isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise InvalidRequest("one prompt per request: send each prompt as its own request",
                                 code="unsupported_parameter", param="prompt")
        if not self.text().strip():
            raise InvalidRequest("prompt: the prompt holds no text", code="invalid_value", param="prompt")
        if self.suffix:
            raise InvalidRequest("suffix (insertion) is not supported", code="unsupported_parameter", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of other than n is not supported", code="unsupported_parameter",
                                 param="best_of")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs (the prompt's own logprobs) is not supported",
                                 code="unsupported_parameter", param="echo")
        body: dict[str, Any] = {"messages": [{"role": "user", "content": self.text()}]}
        for name in ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                     "presence_penalty", "frequency_penalty", "logit_bias", "user"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value.model_dump() if isinstance(value, BaseModel) else value
        if self.logprobs is not None:
            body |= {"logprobs": True, "top_logprobs": self.logprobs}
        try:
            return ChatRequest.model_validate(body).as_raw_prompt()
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(p) for p in first["loc"]]
            param = ".".join([_PARAMS.get(loc[0], loc[0]), *loc[1:]]) if loc else None
            msg = str(first["msg"]).removeprefix("Value error, ")
            raise InvalidRequest(f"{param}: {msg}" if param else msg, code="invalid_value", param=param) from None


def legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Our per-token logprobs in the legacy shape: parallel lists, the alternatives as {token: logprob}."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e.get("top_logprobs", [])} for e in entries],
            "text_offset": offsets}


class CompletionWriter(ChunkWriter):
    """text_completion chunks; the stream id is the completion id. `echo` sends the prompt first."""

    def __init__(self, stream_id: str, model: str, created: int, include_usage: bool, echo: str | None,
                 logprobs: bool) -> None:
        self.include_usage = include_usage
        self.echo = echo
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # characters sent per choice (text_offset)
        self.ended: set[int] = set()
        self.head = orjson.dumps({"id": stream_id, "object": "text_completion", "created": created,
                                  "model": model})[:-1]

    def _chunk(self, text: str, index: int, finish: FinishReason | None, logprobs: Any = None) -> bytes:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return self.head + b',"choices":[' + orjson.dumps(choice) + b"]}"

    def _meta(self, e: Meta) -> bytes:
        return sse.data_frame(self._chunk(self.echo, 0, None), e.seq) if self.echo else b""

    def _token(self, e: Token) -> bytes:
        index = e.choice
        if e.finish_reason is not None:
            self.ended.add(index)
            return sse.data_frame(self._chunk("", index, e.finish_reason), e.seq)
        start = self.offsets.get(index, len(self.echo or ""))
        self.offsets[index] = start + len(e.text)
        lp = legacy_logprobs(e.logprobs, start) if self.logprobs and e.logprobs is not None else None
        return sse.data_frame(self._chunk(e.text, index, None, lp), e.seq)

    def _done(self, e: Done) -> bytes:
        ends = [(c.index, c.finish_reason) for c in e.choices] if e.choices is not None else [(0, e.finish_reason)]
        out = b"".join(sse.data_frame(self._chunk("", i, reason), e.seq) for i, reason in ends if i not in self.ended)
        if self.include_usage:
            out += sse.data_frame(self.head + b',"choices":[],"usage":' + orjson.dumps(openai_usage(e)) + b"}",
                                  e.seq)
        return out + sse.DONE


def text_completion(echo: str, logprobs: bool) -> Any:
    """How the collected events of a `stream: false` completion become its answer (`_collect` in
    api/routers/openai.py)."""
    def build(stream_id: str, model: str, created: int, texts: dict[int, str], done: Done,
              lps: dict[int, list[Any]], calls: dict[int, Calls]) -> dict[str, Any]:
        return {
            "id": stream_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": echo + texts[i], "index": i, "finish_reason": done.finish_of(i),
                         "logprobs": legacy_logprobs(lps.get(i, []), len(echo)) if logprobs else None}
                        for i in sorted(texts)],
            "usage": openai_usage(done),
        }
    return build
