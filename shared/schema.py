"""The validated chat request and the job payload built from it.

The request model accepts what OpenAI's chat API accepts (unknown fields
are ignored, as OpenAI does); `JobPayload` is the JSON contract between API
and worker, validated again by the worker before it runs anything.

Booleans, integers and numbers are strict, as OpenAI's are: pydantic's lax
mode would take `"max_tokens": true` as 1 and `"stream": "yes"` as true. A
number field still takes an integer (`"temperature": 1`): JSON has one
number type.

One module past 400 lines on purpose: the request models and the job payload are
validated by the same rules at the edge and again in the worker, so they live together.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    field_validator,
    model_validator,
)

from tokenfan.shared import structured
from tokenfan.shared import tools as toolcalls
from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.settings import ApiSettings

Role = Literal["system", "user", "assistant", "developer"]
JobRole = Literal["system", "user", "assistant", "developer", "tool"]
# What Redis, RQ's JSON and orjson can carry: a seed is stored as a signed 64-bit integer.
INT64 = 2**63
# OpenAI's caps: alternatives per token, and entries of logit_bias (token ids fit llama.cpp's int32).
MAX_TOP_LOGPROBS: Final = 20
# Choices per request: each takes a slot of the worker (issue 13's cap).
MAX_N: Final = 4
MAX_LOGIT_BIAS: Final = 300
MAX_TOKEN_ID: Final = 2**31 - 1
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


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



def _nullable_in_schema(schema: dict[str, Any]) -> None:
    """The OpenAPI schema says what `OpenAIRequest` takes: null for every parameter."""
    for name, prop in schema.get("properties", {}).items():
        if name in schema.get("required", ()) or _takes_null(prop):
            continue
        extra = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        schema["properties"][name] = {"anyOf": [dict(prop), {"type": "null"}], **extra}


def _takes_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(p.get("type") == "null" for p in prop.get("anyOf", ()))


class OpenAIRequest(BaseModel):
    """A request body of an OpenAI route: an explicit null on a parameter is the parameter not given.

    OpenAI's schema makes its optional parameters nullable (`temperature`, `n`, `stream`, `store`, ...)
    and the SDKs send null for a None; a null here takes the parameter's default, as leaving it out does.
    A required parameter given as null is still missing (a 400 naming it)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_nullable_in_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict) or None not in data.values():
            return data
        known = {f.alias or name for name, f in cls.model_fields.items()} | set(cls.model_fields)
        return {k: v for k, v in data.items() if v is not None or k not in known}


# True once this request's body passed every check in a worker thread (api/bodies.py): the same
# validation on the API's event loop (FastAPI's, a route's own) then skips the costly conversions
# of schemas and tools (issue 27: a 961 KB response_format froze every stream on an API for 16 s).
COSTLY_CHECKED: ContextVar[bool] = ContextVar("tokenfan_costly_checked", default=False)
# The grammar limits this request's schemas and tools are checked against: the API's settings, set by
# api/bodies.py for the request before any validation. A context variable rather than pydantic's
# validation context because a route validates chat requests of its own too (a Responses request's
# `to_chat`), and those must see the same limits; the default is the defaults (shared/defaults.py).
GRAMMAR_LIMITS: ContextVar[structured.Limits] = ContextVar("tokenfan_grammar_limits",
                                                           default=structured.DEFAULT_LIMITS)


class ParamError(ValueError):
    """A check of the whole request whose error is about one field: pydantic gives such an error no
    location, so it carries its own (the API's error `param`). Its message starts with the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=toolcalls.NAME_PATTERN)]
    arguments: Text


class ToolCall(BaseModel):
    """A call the assistant made earlier in the conversation, as OpenAI's answer carried it."""

    model_config = ConfigDict(extra="ignore")
    id: Annotated[Text, Field(min_length=1, max_length=128)]
    type: Literal["function"] = "function"
    function: FunctionCall


class _Content(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _NoCalls(BaseModel):
    """Only the assistant's messages carry `tool_calls`: on another role it is refused, not dropped."""

    tool_calls: None = Field(default=None, description="only on the assistant's messages")

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _only_the_assistants(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("only an assistant message carries tool_calls")
        return None


class PlainMessage(_NoCalls, _Content):
    role: Literal["system", "user", "developer"]
    content: Text | list[TextPart]
    name: Text | None = None


class AssistantMessage(_Content):
    """An earlier answer: its text, its calls, or both (content may be null or left out with calls)."""

    role: Literal["assistant"]
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=toolcalls.MAX_CALLS * 4)] | None = None


class ToolMessage(_NoCalls, _Content):
    """A tool's result, answering the call `tool_call_id`."""

    role: Literal["tool"]
    content: Text | list[TextPart]
    tool_call_id: Annotated[Text, Field(min_length=1, max_length=128)]


# The message's role says its shape (so the OpenAPI schema says it too).
Message = Annotated[PlainMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=toolcalls.NAME_PATTERN)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: Bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`; the schema is converted here, so a bad one is a 400."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None

    @model_validator(mode="after")
    def _convertible(self) -> JsonSchemaFormat:
        if self.schema_ is not None and not COSTLY_CHECKED.get():
            try:
                structured.check(self.schema_, GRAMMAR_LIMITS.get())
            except structured.SchemaError as exc:
                raise ValueError(f"schema.{exc}" if exc.where else f"schema: {exc}") from None
        return self


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The schema the answer must match (json_object: any object); None for plain text."""
        if self.type == "json_object" or (self.json_schema is not None and self.json_schema.schema_ is None):
            return dict(structured.JSON_OBJECT)
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return None


def _logit_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    if v is None:
        return None
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
    for key, bias in v.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) > MAX_TOKEN_ID:
            raise ValueError(f"{key[:20]!r} is not a token id (a string of decimal digits)")
        if not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {key} must be from -100 to 100")
    return v


class ChatRequest(OpenAIRequest):
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
    n: Int = Field(default=1, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: Number = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Number = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, Number] | None, AfterValidator(_logit_bias)] = None
    user: Text | None = None
    tools: Annotated[list[Tool], Field(max_length=toolcalls.MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool = True
    cancel_on_disconnect: Bool = False
    # POST /v1/completions: the one user message is the whole prompt, as it is, with no chat template.
    _raw_prompt: bool = PrivateAttr(default=False)

    def as_raw_prompt(self) -> ChatRequest:
        self._raw_prompt = True
        return self

    def raw_prompt(self) -> str | None:
        return self.messages[0].text() if self._raw_prompt else None

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

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tools(self) -> ChatRequest:
        """Tool names unique, every parameters schema convertible, a named tool_choice one of the tools."""
        if self.tool_choice is not None and not self.tools:
            raise ParamError("tool_choice", "only allowed when tools are given")
        if not self.tools:
            return self
        names = [t.function.name for t in self.tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ParamError("tools", f"the function name {dup!r} is given twice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ParamError("tool_choice", f"{self.tool_choice.function.name[:64]!r} is not one of the tools' "
                             "functions")
        try:
            if not COSTLY_CHECKED.get():
                toolcalls.check(self.tool_specs(), GRAMMAR_LIMITS.get())
        except structured.SchemaError as exc:
            where = f"tools.{exc.where}" if exc.where else "tools"
            raise ParamError(where, str(exc).removeprefix(f"{exc.where}: ") if exc.where else str(exc)) from None
        return self

    def tool_specs(self) -> list[dict[str, Any]]:
        return [t.function.model_dump(exclude_none=True, exclude={"strict"}) for t in self.tools or []]

    def job_tools(self) -> tuple[list[dict[str, Any]], Literal["auto", "required"]]:
        """The tools the job offers the model and how ("auto" or "required"): none for tool_choice
        "none"; a named function is "required" with that function alone."""
        choice = self.tool_choice or "auto"
        if not self.tools or choice == "none":
            return [], "auto"
        if isinstance(choice, NamedToolChoice):
            return [s for s in self.tool_specs() if s["name"] == choice.function.name], "required"
        return self.tool_specs(), "required" if choice == "required" else "auto"

    def wanted_logprobs(self) -> int | None:
        """Alternatives per token when logprobs are asked for (0: the chosen token's only); None when not."""
        return (self.top_logprobs or 0) if self.logprobs else None

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


class JobToolCall(BaseModel):
    id: str
    name: str
    arguments: str


class JobMessage(BaseModel):
    role: JobRole
    content: str
    tool_calls: list[JobToolCall] | None = None
    tool_call_id: str | None = None

    @classmethod
    def of(cls, m: PlainMessage | AssistantMessage | ToolMessage) -> JobMessage:
        calls = None if not isinstance(m, AssistantMessage) or not m.tool_calls else [
            JobToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls]
        call_id = m.tool_call_id if isinstance(m, ToolMessage) else None
        return cls(role=m.role, content=m.text(), tool_calls=calls, tool_call_id=call_id)


# Sampling fields a job carries only when they differ from these defaults (`dump`), so a job that uses
# none of them is the same JSON an older worker reads (it forbids fields it does not know).
OPTIONAL_SAMPLING: Final = ("json_schema", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "n",
                             "tools", "tool_choice", "max_calls", "prompt")


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
    json_schema: dict[str, Any] | None = None  # the answer is JSON matching it (grammar-constrained)
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # top alternatives; None: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = Field(default_factory=dict)  # token id (decimal string) -> bias
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1  # choices, each its own slot
    tools: list[dict[str, Any]] = Field(default_factory=list)  # {name, description, parameters} (shared/tools.py)
    tool_choice: Literal["auto", "required"] = "auto"
    max_calls: Annotated[int, Field(ge=1, le=toolcalls.MAX_CALLS)] = toolcalls.MAX_CALLS
    prompt: str | None = None  # /v1/completions: the text to go on from, with no chat template
    disclosure: str = ""
    enqueued_at: float
    attempt: int = 0

    @classmethod
    def from_request(
        cls, req: ChatRequest, *, stream_id: str, model: str, settings: ApiSettings, now: float
    ) -> JobPayload:
        offered, choice = req.job_tools()  # choice: "auto" or "required"
        return cls(
            stream_id=stream_id,
            model=model,
            messages=[JobMessage.of(m) for m in req.messages],
            max_tokens=req.wanted_tokens(settings),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop or []),
            seed=req.seed,
            json_schema=req.response_format.answer_schema() if req.response_format else None,
            logprobs=req.wanted_logprobs(),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=dict(req.logit_bias or {}),
            n=req.n,
            tools=offered,
            tool_choice=choice,
            max_calls=toolcalls.MAX_CALLS if req.parallel_tool_calls else 1,
            prompt=req.raw_prompt(),
            disclosure=settings.disclosure,
            enqueued_at=now,
        )

    def dump(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        for m in out["messages"]:  # a message's tool fields only where it has them
            for name in ("tool_calls", "tool_call_id"):
                if m[name] is None:
                    del m[name]
        for name in OPTIONAL_SAMPLING:
            if out[name] == JobPayload.model_fields[name].get_default(call_default_factory=True):
                del out[name]
        return out
