"""The validated chat request and the job payload built from it.

The request model accepts what OpenAI's chat API accepts (unknown fields
are ignored, as OpenAI does); `JobPayload` is the JSON contract between API
and worker, validated again by the worker before it runs anything.

Booleans, integers and numbers are strict, as OpenAI's are: pydantic's lax
mode would take `"max_tokens": true` as 1 and `"stream": "yes"` as true. A
number field still takes an integer (`"temperature": 1`): JSON has one
number type.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.settings import ApiSettings

Role = Literal["system", "user", "assistant", "developer"]
# What Redis, RQ's JSON and orjson can carry: a seed is stored as a signed 64-bit integer.
INT64 = 2**63


def _unicode(s: str) -> str:
    """JSON's `\\udXXX` escapes can spell a lone surrogate, which no UTF-8 encoder accepts."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode: an unpaired surrogate (\\ud800-\\udfff) "
                         "is not allowed") from None
    return s


# Every string a request keeps: it is stored and sent on as UTF-8.
Text = Annotated[str, AfterValidator(_unicode)]
# JSON's true/false, integers and numbers only: no strings, no bools for numbers, no floats for integers.
Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Role
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: Bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: Bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = Field(default=None, gt=0)
    max_completion_tokens: Int | None = Field(default=None, gt=0)
    temperature: Number = Field(default=0.7, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: Int | None = Field(default=None, ge=-INT64, lt=INT64)
    n: Int = Field(default=1, ge=1, le=1)
    cancel_on_disconnect: Bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return items

    @model_validator(mode="after")
    def _has_content(self) -> ChatRequest:
        if not any(m.text().strip() for m in self.messages):
            raise ValueError("messages hold no text")
        return self

    def wanted_tokens(self, settings: ApiSettings) -> int:
        default = min(settings.default_max_tokens, settings.max_tokens_cap)
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def check_caps(req: ChatRequest, settings: ApiSettings) -> None:
    """Configured caps, each error naming the cap it hit."""
    if req.wanted_tokens(settings) > settings.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens must be at most {settings.max_tokens_cap}", code="max_tokens_too_large", param="max_tokens"
        )
    if len(req.messages) > settings.max_messages:
        raise InvalidRequest(
            f"at most {settings.max_messages} messages are allowed", code="too_many_messages", param="messages"
        )
    if sum(len(m.text()) for m in req.messages) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"the prompt is longer than {settings.max_prompt_chars} characters",
            code="context_length_exceeded",
            param="messages",
        )
    if req.stop and len(req.stop) > settings.max_stop:
        raise InvalidRequest(f"at most {settings.max_stop} stop sequences", code="too_many_stop", param="stop")


class JobMessage(BaseModel):
    role: Role
    content: str


class JobPayload(BaseModel):
    """What a job carries: the stream id and the validated request."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    stream_id: Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    model: str
    messages: Annotated[list[JobMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(gt=0)]
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    disclosure: str = ""
    enqueued_at: float
    attempt: int = 0

    @classmethod
    def from_request(
        cls, req: ChatRequest, *, stream_id: str, model: str, settings: ApiSettings, now: float
    ) -> JobPayload:
        return cls(
            stream_id=stream_id,
            model=model,
            messages=[JobMessage(role=m.role, content=m.text()) for m in req.messages],
            max_tokens=req.wanted_tokens(settings),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop or []),
            seed=req.seed,
            disclosure=settings.disclosure,
            enqueued_at=now,
        )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
