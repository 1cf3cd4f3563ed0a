"""What a response keeps beside its stream (its record), and its ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

RESP_PREFIX = "resp_"
MSG_PREFIX = "msg_"


class Record(BaseModel):
    """What a response keeps beside its stream: what it was asked with, as the response object echoes it."""

    # First, so the terminal publish reads it without parsing the record (shared/bus.py): seconds the
    # record and its events are kept once the response ended (0: with the log, a record before it).
    ttl_s: int = 0
    owner: str = ""
    model: str
    created_at: float
    background: bool
    store: bool
    instructions: str | None
    metadata: dict[str, str]
    max_output_tokens: int | None
    temperature: float
    top_p: float
    text_format: dict[str, Any]
    user: str | None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    top_logprobs: int | None = None
    # The chat messages before this response's output (the previous responses' and this input; no
    # instructions: they are the turn's own), and this input as `input_items` lists it.
    conversation: list[dict[str, Any]] = Field(default_factory=list)
    input_items: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class View:
    """One response: its ids and its record."""

    sid: str
    rec: Record

    @property
    def rid(self) -> str:
        return RESP_PREFIX + self.sid

    @property
    def msg_id(self) -> str:
        return MSG_PREFIX + self.sid
