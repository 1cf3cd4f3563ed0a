"""A Responses API request (`POST /v1/responses`): its checks, its history and its input items."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tokenfan.api.responses.convert import to_chat
from tokenfan.api.responses.items import (
    FunctionChoice,
    FunctionTool,
    InputItem,
    InputMessage,
    TextConfig,
    chat_messages,
)
from tokenfan.shared.defaults import MAX_STREAM_ID_CHARS
from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.schema import Bool, ChatRequest, Int, Number, OpenAIRequest, ParamError, Text

ITEM_PREFIX = "item_"
# OpenAI's bounds on `metadata`.
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
# Parameters whose meaning tokenfan does not carry out yet: refused, never silently dropped.
UNSUPPORTED = ("conversation", "prompt")


class ResponsesRequest(OpenAIRequest):
    model: Text | None = None
    # Optional with previous_response_id (as OpenAI's): the stored conversation goes on as it is.
    input: Text | Annotated[list[InputItem], Field(min_length=1)] | None = None
    instructions: Text | None = None
    max_output_tokens: Int | None = Field(default=None, gt=0)
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0)
    stream: Bool = False
    background: Bool = False
    store: Bool = True
    metadata: dict[Text, Text] | None = None
    text: TextConfig | None = None
    user: Text | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: Bool | None = None
    top_logprobs: Int | None = None
    include: list[Text] | None = None
    previous_response_id: Annotated[Text, Field(min_length=1, max_length=MAX_STREAM_ID_CHARS + 8)] | None = None
    conversation: Any = None
    prompt: Any = None

    @field_validator("input")
    @classmethod
    def _has_text(cls, v: str | list[InputItem] | None) -> str | list[InputItem] | None:
        if v is not None and not (v.strip() if isinstance(v, str) else any(m.text().strip() for m in v)):
            raise ValueError("input holds no text")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_caps(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > METADATA_MAX_PAIRS:
            raise ValueError(f"at most {METADATA_MAX_PAIRS} metadata pairs")
        if any(len(k) > METADATA_MAX_KEY for k in v) or any(len(x) > METADATA_MAX_VALUE for x in v.values()):
            raise ValueError(f"metadata keys are at most {METADATA_MAX_KEY} characters, values {METADATA_MAX_VALUE}")
        return v

    @model_validator(mode="after")
    def _input_or_previous(self) -> ResponsesRequest:
        if self.input is None and self.previous_response_id is None:
            raise ParamError("input", "required unless previous_response_id is given")
        return self

    def items(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return self.input or []

    def history(self, prefix: list[dict[str, Any]], check: bool = True) -> list[dict[str, Any]]:
        """The previous responses' conversation (`prefix`), then this input: what the next turn goes on
        from (`check`: every call's output answers a call before it)."""
        known = {c["id"] for m in prefix for c in m.get("tool_calls") or ()}
        return prefix + chat_messages(self.items(), known, check)

    def input_items(self, sid: str) -> list[dict[str, Any]]:
        """This input's items as `input_items` lists them: each with an id and its content as parts."""
        out = []
        for i, item in enumerate(self.items()):
            if isinstance(item, InputMessage):
                kind = "output_text" if item.role == "assistant" else "input_text"
                body: dict[str, Any] = {"type": "message", "role": item.role,
                                        "content": [{"type": kind, "text": item.text()}]}
            else:
                body = item.model_dump(exclude_none=True)
            out.append({"id": f"{ITEM_PREFIX}{sid}_{i}", **body, "status": "completed"})
        return out

    def to_chat(self) -> ChatRequest:
        """The chat request this response runs as (api/bodies.py checks it off the event loop), without
        the previous response's conversation (it is in Redis): an output may answer one of its calls."""
        own = self.history([], check=self.previous_response_id is None)
        # No input of its own: the previous conversation (in Redis) is the whole prompt; a stand-in
        # message lets the rest (tools, format, limits) be checked here as for any other.
        return to_chat(self, own or [{"role": "user", "content": "(the previous response's conversation)"}])

    def refuse_unsupported(self) -> None:
        for name in UNSUPPORTED:
            if getattr(self, name) is not None:
                raise InvalidRequest(f"{name} is not supported yet", code="unsupported_parameter", param=name)
        if self.background and not self.store:
            raise InvalidRequest("background responses must be stored: store=false cannot be background",
                                 code="invalid_value", param="store")
