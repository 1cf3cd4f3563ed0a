"""The event schema: one small class per event type, one way to encode them.

An event travels as one line of JSON, the same bytes in the stream's log, on
its channel and in the `data:` field of the SSE event, so the API relays it
without re-encoding (`raw` keeps the bytes an event was decoded from or
encoded to). JSON from orjson never holds a raw newline (it escapes control
characters), so an event is one `data:` line; the SSE framing is the API's
(api/sse.py, sse-starlette's), which splits any line break a payload might
still hold into `data:` lines of the same event.

The worker makes `Meta`, `Disclosure`, `Token`, `Done` and `Error` (the
logged ones, in the seq space); the API makes `Queued`, `Reconnect` and an
`Error` of its own, which are never logged and carry the last seq sent as
their SSE id. The reasons a stream or a choice ends and the reasons it is
cancelled are enums here; so is every event's type. docs/protocol.md's
tables are checked against them (tests/unit/test_docs_match_code.py).

Deliberate departures from the obvious:
- the payload is flat (`{"seq":3,"type":"token","ts":…,"text":"hi"}`), not
  nested under `data`, so a browser reads `JSON.parse(e.data).text`;
- an optional field is left out of the JSON, not written as null (a token
  event is `text` alone unless it has more to say), and a field's place in
  the JSON is its place in the class: the bytes are those the worker wrote
  when payloads were plain dicts, so logs written then decode the same;
- the classes are slotted dataclasses with a hand-written encoder, not
  pydantic models: a token event is made, encoded and decoded per token,
  and validation there would cost more than the rest of its path; `decode`
  checks what a consumer relies on (the seq, the type, the enums);
- `ts` is the worker's publish time, used for the relay-lag metric; the
  hosts' clocks are assumed to be NTP-synchronised.

One module past 400 lines on purpose: the event classes, their encoder and decoder
and the enums are the one contract worker and API share, read and changed together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final

import orjson


class EventType(StrEnum):
    """An event's `type` (and its SSE `event:` name)."""

    META = "meta"
    DISCLOSURE = "disclosure"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"
    QUEUED = "queued"  # the API's own: never logged
    RECONNECT = "reconnect"  # the API's own: never logged


META: Final = EventType.META
DISCLOSURE: Final = EventType.DISCLOSURE
TOKEN: Final = EventType.TOKEN
DONE: Final = EventType.DONE
ERROR: Final = EventType.ERROR
QUEUED: Final = EventType.QUEUED
RECONNECT: Final = EventType.RECONNECT
TERMINAL: Final = frozenset({DONE, ERROR})
TYPES: Final = frozenset({META, DISCLOSURE, TOKEN, DONE, ERROR})  # the types a stream's log holds


class FinishReason(StrEnum):
    """Why a stream (`Done.finish_reason`) or one of its choices (a `Token`'s) ended."""

    STOP = "stop"  # the model's end of text, or a stop string
    LENGTH = "length"  # max_tokens, or the end of the model's context
    TOOL_CALLS = "tool_calls"  # an answer that made calls and stopped
    CANCELLED = "cancelled"  # the cancel flag; `Done.cancel_reason` says whose


class CancelReason(StrEnum):
    """Why a stream was cancelled: the value of its cancel flag, and `Done.cancel_reason`."""

    CLIENT = "client"  # DELETE /v1/streams/{id}, or the Responses API's cancel or delete
    DISCONNECT = "disconnect"  # the last viewer of a `cancel_on_disconnect` stream left
    ABANDONED = "abandoned"  # no viewer for `abandon_grace_s`
    TIMEOUT = "timeout"  # a `"stream": false` request had no answer within `request_timeout_s`

    @classmethod
    def of_flag(cls, value: bytes | str | None) -> CancelReason:
        """The reason a cancel flag holds; a value this code does not know (a newer API's) still
        cancels, as a client's cancel."""
        try:
            return cls(value.decode() if isinstance(value, bytes) else value or "")
        except ValueError:
            return cls.CLIENT


# --- the parts of events --------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class ToolCallPiece:
    """A piece of a tool call (`Token.tool_call`): its index in the answer, the next piece of its JSON
    arguments, and in its first piece its id and function name."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def wire(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "name": self.name or "", "arguments": self.arguments}

    @classmethod
    def read(cls, obj: Mapping[str, Any]) -> ToolCallPiece:
        name = obj.get("name")
        return cls(int(obj.get("index", 0)), str(obj.get("arguments", "")), obj.get("id"),
                   None if name is None else str(name))


@dataclass(slots=True, frozen=True)
class Usage:
    """Tokens of a stream: the prompt's (of which `cached_tokens` came from a slot's prompt cache
    instead of being decoded; left out of the JSON when none did) and the answer's."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def wire(self) -> dict[str, Any]:
        out = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "total_tokens": self.total_tokens}
        if self.cached_tokens:
            out["cached_tokens"] = self.cached_tokens
        return out

    @classmethod
    def read(cls, obj: Mapping[str, Any]) -> Usage:
        return cls(int(obj.get("prompt_tokens", 0)), int(obj.get("completion_tokens", 0)),
                   int(obj.get("cached_tokens", 0)))


@dataclass(slots=True, frozen=True)
class Timings:
    """Where a stream's time went, as its worker measured it (all 0 for one that never reached one)."""

    queue_wait_ms: float = 0.0
    ttft_ms: float = 0.0
    gen_ms: float = 0.0
    tokens_per_s: float = 0.0
    worker: str = ""

    def wire(self) -> dict[str, Any]:
        return {"queue_wait_ms": self.queue_wait_ms, "ttft_ms": self.ttft_ms, "gen_ms": self.gen_ms,
                "tokens_per_s": self.tokens_per_s, "worker": self.worker}

    @classmethod
    def read(cls, obj: Mapping[str, Any]) -> Timings:
        return cls(float(obj.get("queue_wait_ms", 0.0)), float(obj.get("ttft_ms", 0.0)),
                   float(obj.get("gen_ms", 0.0)), float(obj.get("tokens_per_s", 0.0)), str(obj.get("worker", "")))


@dataclass(slots=True, frozen=True)
class ChoiceEnd:
    """How one choice of a stream with several (`n` > 1) ended (`Done.choices`)."""

    index: int
    finish_reason: FinishReason

    def wire(self) -> dict[str, Any]:
        return {"index": self.index, "finish_reason": self.finish_reason}


# --- the events -----------------------------------------------------------------------------------

@dataclass(slots=True)
class Event:
    """What every event has: its `seq` in the stream (an event the API makes carries the last seq
    sent), its publish time `ts`, and once encoded or decoded its bytes (`raw`)."""

    type: ClassVar[EventType]
    terminal: ClassVar[bool] = False
    seq: int
    _: KW_ONLY
    ts: float = 0.0
    raw: bytes = field(default=b"", compare=False, repr=False)

    def put(self, out: dict[str, Any]) -> None:
        """Add the payload's fields to `out`, in wire order."""
        raise NotImplementedError

    def fields(self) -> dict[str, Any]:
        """The payload: every field but seq, type and ts."""
        out: dict[str, Any] = {}
        self.put(out)
        return out

    def encode(self) -> bytes:
        """The event's one line of JSON, made once; `ts` is set now if it was not."""
        if not self.raw:
            self.ts = self.ts or time.time()
            out: dict[str, Any] = {"seq": self.seq, "type": self.type, "ts": self.ts}
            self.put(out)
            self.raw = orjson.dumps(out)
        return self.raw

    def api_encode(self) -> bytes:
        """The JSON of an event the API makes (not logged): its type and payload, no seq and no ts."""
        out: dict[str, Any] = {"type": self.type}
        self.put(out)
        return orjson.dumps(out)


@dataclass(slots=True)
class Meta(Event):
    """First, and again on every takeover (`resumed`)."""

    type: ClassVar[EventType] = EventType.META
    stream_id: str
    model: str
    worker: str
    created: float
    resumed: bool

    def put(self, out: dict[str, Any]) -> None:
        out["stream_id"], out["model"], out["worker"] = self.stream_id, self.model, self.worker
        out["created"], out["resumed"] = self.created, self.resumed

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Meta:
        return cls(seq, str(obj.get("stream_id", "")), str(obj.get("model", "")), str(obj.get("worker", "")),
                   float(obj.get("created", 0.0)), bool(obj.get("resumed", False)))


@dataclass(slots=True)
class Disclosure(Event):
    """The configured AI-generated notice, right after the first `meta`."""

    type: ClassVar[EventType] = EventType.DISCLOSURE
    text: str

    def put(self, out: dict[str, Any]) -> None:
        out["text"] = self.text

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Disclosure:
        return cls(seq, str(obj.get("text", "")))


@dataclass(slots=True)
class Token(Event):
    """A piece of the answer. Only `text` is always there; the rest only where it says something:
    `index` the choice (only with n > 1), `finish_reason` a choice's end (n > 1: no text), `tool_call`
    a piece of a call, `raw_text` the model's text behind the event where it differs from `text` and
    `tokens` the model tokens it stands for where not 1 (both for a takeover), `logprobs` OpenAI's
    entries of its tokens when asked for."""

    type: ClassVar[EventType] = EventType.TOKEN
    text: str
    _: KW_ONLY
    tool_call: ToolCallPiece | None = None
    raw_text: str | None = None
    tokens: int = 1
    index: int | None = None
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: FinishReason | None = None

    @property
    def choice(self) -> int:
        """The choice the token belongs to (0 unless n > 1)."""
        return self.index or 0

    @property
    def model_text(self) -> str:
        """The model's text behind the event (what a takeover continues from)."""
        return self.text if self.raw_text is None else self.raw_text

    def put(self, out: dict[str, Any]) -> None:
        out["text"] = self.text
        if self.tool_call is not None:
            out["tool_call"] = self.tool_call.wire()
        if self.raw_text is not None:
            out["raw"] = self.raw_text
        if self.tokens != 1:
            out["tokens"] = self.tokens
        if self.index is not None:
            out["index"] = self.index
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason

    def encode(self) -> bytes:
        """The hot path (one per token): a plain text token in one dict literal."""
        if not self.raw:
            self.ts = self.ts or time.time()
            if (self.tool_call is None and self.raw_text is None and self.tokens == 1 and self.index is None
                    and self.logprobs is None and self.finish_reason is None):
                self.raw = orjson.dumps({"seq": self.seq, "type": "token", "ts": self.ts, "text": self.text})
            else:
                out: dict[str, Any] = {"seq": self.seq, "type": "token", "ts": self.ts}
                self.put(out)
                self.raw = orjson.dumps(out)
        return self.raw

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Token:
        if len(obj) == 4 and "text" in obj and "ts" in obj:  # seq, type, ts, text: a plain token
            return cls(seq, obj["text"])
        call, reason, index = obj.get("tool_call"), obj.get("finish_reason"), obj.get("index")
        return cls(seq, str(obj.get("text", "")), tool_call=None if call is None else ToolCallPiece.read(call),
                   raw_text=obj.get("raw"), tokens=int(obj.get("tokens", 1)),
                   index=None if index is None else int(index), logprobs=obj.get("logprobs"),
                   finish_reason=None if reason is None else FinishReason(reason))


@dataclass(slots=True)
class Done(Event):
    """The stream's end when it was not an error: its finish reason, usage and timings; with n > 1 each
    choice's end (`choices`); when cancelled, whose cancel it was."""

    type: ClassVar[EventType] = EventType.DONE
    terminal: ClassVar[bool] = True
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    _: KW_ONLY
    choices: list[ChoiceEnd] | None = None
    cancel_reason: CancelReason | None = None

    def put(self, out: dict[str, Any]) -> None:
        out["finish_reason"], out["usage"], out["timings"] = self.finish_reason, self.usage.wire(), self.timings.wire()
        if self.choices is not None:
            out["choices"] = [c.wire() for c in self.choices]
        if self.cancel_reason is not None:
            out["cancel_reason"] = self.cancel_reason

    def finish_of(self, index: int) -> FinishReason:
        """How choice `index` ended: its own end with n > 1, else the stream's."""
        for c in self.choices or ():
            if c.index == index:
                return c.finish_reason
        return self.finish_reason

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Done:
        choices, cancel = obj.get("choices"), obj.get("cancel_reason")
        return cls(seq, FinishReason(obj.get("finish_reason", FinishReason.STOP)), Usage.read(obj.get("usage") or {}),
                   Timings.read(obj.get("timings") or {}),
                   choices=None if choices is None else [ChoiceEnd(int(c.get("index", 0)),
                                                                   FinishReason(c.get("finish_reason", "stop")))
                                                         for c in choices],
                   cancel_reason=None if cancel is None else CancelReason(cancel))


@dataclass(slots=True)
class Error(Event):
    """The stream's end in failure (or, made by the API, the end of one client's response): a code of
    shared/errors.py's, a message, and whether trying again may succeed."""

    type: ClassVar[EventType] = EventType.ERROR
    terminal: ClassVar[bool] = True
    code: str
    message: str
    retryable: bool

    def put(self, out: dict[str, Any]) -> None:
        out["code"], out["message"], out["retryable"] = self.code, self.message, self.retryable

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Error:
        return cls(seq, str(obj.get("code", "engine_error")), str(obj.get("message", "")),
                   bool(obj.get("retryable", False)))


@dataclass(slots=True)
class Queued(Event):
    """The API's, about once a second while the job waits: its place in the queue (0 is next)."""

    type: ClassVar[EventType] = EventType.QUEUED
    position: int

    def put(self, out: dict[str, Any]) -> None:
        out["position"] = self.position

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Queued:
        return cls(seq, int(obj.get("position", 0)))


@dataclass(slots=True)
class Reconnect(Event):
    """The API's, when it shuts down: resume on another replica from `seq` (the stream goes on)."""

    type: ClassVar[EventType] = EventType.RECONNECT
    reason: str = "server_shutdown"

    def put(self, out: dict[str, Any]) -> None:
        out["reason"], out["last_event_id"] = self.reason, self.seq

    @classmethod
    def read(cls, seq: int, obj: Mapping[str, Any]) -> Reconnect:
        return cls(int(obj.get("last_event_id", seq)), str(obj.get("reason", "server_shutdown")))


_LOGGED: Final[dict[str, Any]] = {META: Meta, DISCLOSURE: Disclosure, TOKEN: Token, DONE: Done, ERROR: Error}
_API: Final[dict[str, Any]] = {QUEUED: Queued, RECONNECT: Reconnect, ERROR: Error}


def decode(raw: bytes | str) -> Event:
    """Parse one stored or published event; raises ValueError on garbage."""
    if isinstance(raw, str):
        raw = raw.encode()
    obj = orjson.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("event is not a JSON object")
    seq, kind = obj.get("seq"), obj.get("type")
    cls = _LOGGED.get(kind) if isinstance(kind, str) else None
    if cls is None or type(seq) is not int:  # a bool is an int too, and no seq
        raise ValueError("event without a valid seq or type")
    try:
        ev: Event = cls.read(seq, obj)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"a {kind} event with a field of the wrong type or value: {exc}") from None
    ev.ts, ev.raw = float(obj.get("ts", 0.0)), raw
    return ev


def decode_frame(data: bytes | str, last_id: int) -> Event:
    """An event as a client reads it from a native SSE stream: a logged one, or one the API made
    (`queued`, `reconnect`, its own `error`: no seq of their own; `last_id` is the frame's `id:`)."""
    obj = orjson.loads(data)
    if isinstance(obj, dict) and "seq" in obj:
        return decode(data)
    kind = obj.get("type") if isinstance(obj, dict) else None
    cls = _API.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError("not an event of the native stream")
    ev: Event = _read(cls, last_id, obj)
    return ev


def _read(cls: Any, seq: int, obj: dict[str, Any]) -> Event:
    try:
        ev: Event = cls.read(seq, obj)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"a {cls.type} event with a field of the wrong type or value: {exc}") from None
    return ev
