"""The event schema: one small class, one way to encode it.

An event travels as one line of JSON, the same bytes in the stream's log, on
its channel and in the `data:` field of the SSE event, so the API relays it
without re-encoding. JSON from orjson never holds a raw newline (it escapes
control characters), so an event is one `data:` line; the SSE framing is
the API's (api/sse.py, sse-starlette's), which splits any line break a
payload might still hold into `data:` lines of the same event.

Deliberate departures from the obvious:
- the payload is flat (`{"seq":3,"type":"token","ts":…,"text":"hi"}`), not
  nested under `data`, so a browser reads `JSON.parse(e.data).text`;
- `ts` is the worker's publish time, used for the relay-lag metric; the
  hosts' clocks are assumed to be NTP-synchronised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

META: Final = "meta"
DISCLOSURE: Final = "disclosure"
TOKEN: Final = "token"
DONE: Final = "done"
ERROR: Final = "error"
QUEUED: Final = "queued"
TERMINAL: Final = frozenset({DONE, ERROR})
TYPES: Final = frozenset({META, DISCLOSURE, TOKEN, DONE, ERROR})


class FinishReason(StrEnum):
    """Why a stream (the `done` event's `finish_reason`) or one of its choices (a token event's) ended."""

    STOP = "stop"  # the model's end of text, or a stop string
    LENGTH = "length"  # max_tokens, or the end of the model's context
    TOOL_CALLS = "tool_calls"  # an answer that made calls and stopped
    CANCELLED = "cancelled"  # the cancel flag; the `done` event's `cancel_reason` says whose


class CancelReason(StrEnum):
    """Why a stream was cancelled: the value of its cancel flag, and the `done` event's `cancel_reason`."""

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


@dataclass(slots=True)
class Event:
    seq: int
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    raw: bytes = b""

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    def encode(self) -> bytes:
        if not self.raw:
            ts = self.ts or time.time()
            self.raw = orjson.dumps({"seq": self.seq, "type": self.type, "ts": ts, **self.data})
        return self.raw


def decode(raw: bytes | str) -> Event:
    """Parse one stored or published event; raises ValueError on garbage."""
    if isinstance(raw, str):
        raw = raw.encode()
    obj = orjson.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("event is not a JSON object")
    seq, kind, ts = obj.pop("seq"), obj.pop("type"), obj.pop("ts", 0.0)
    if not isinstance(seq, int) or kind not in TYPES:
        raise ValueError("event without a valid seq or type")
    return Event(seq=seq, type=kind, data=obj, ts=float(ts), raw=raw)
