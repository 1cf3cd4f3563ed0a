"""A Responses API request as the chat request it runs as, and the Responses names of its errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from tokenfan.api.responses.items import FunctionChoice
from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.schema import ChatRequest, ParamError

if TYPE_CHECKING:
    from tokenfan.api.responses.request import ResponsesRequest

# What `include` names to have each output text's logprobs (also given by `top_logprobs`).
LOGPROBS_INCLUDE = "message.output_text.logprobs"

# Where the chat request's names differ from the Responses API's, for errors raised on the chat request.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


def responses_param(name: str | None) -> str | None:
    if name is None:
        return None
    head, dot, rest = name.partition(".")
    if head in ("tools", "tool_choice"):  # the chat tool's `function` is the Responses tool itself
        rest = rest.replace("function.", "", 1)
    return _PARAMS.get(head, head) + dot + rest


def _chat_tools(req: ResponsesRequest) -> dict[str, Any]:
    """The chat request's tools, tool_choice and parallel_tool_calls, where given."""
    out: dict[str, Any] = {"tools": [t.chat() for t in req.tools]} if req.tools else {}
    if isinstance(req.tool_choice, FunctionChoice):
        out["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        out["tool_choice"] = req.tool_choice
    if req.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = req.parallel_tool_calls
    return out


def to_chat(req: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatRequest:
    """The chat request this response runs as, on `conversation` (`req.history`): 400 naming the
    Responses parameter when it cannot."""
    req.refuse_unsupported()
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body: dict[str, Any] = {"model": req.model, "messages": system + conversation}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    body |= _chat_tools(req)
    if req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or ()):
        body |= {"logprobs": True, "top_logprobs": req.top_logprobs or 0}
    fmt = req.text.format if req.text else None
    wanted = fmt.response_format() if fmt else None
    if wanted is not None:
        if "response_format" not in ChatRequest.model_fields:
            raise InvalidRequest(f"text.format type '{wanted['type']}' is not supported yet",
                                 code="unsupported_parameter", param="text.format")
        body["response_format"] = wanted
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = first.get("ctx", {}).get("error")
        where = cause.param if isinstance(cause, ParamError) else ".".join(str(p) for p in first["loc"])
        param = responses_param(where or None)
        msg = str(first["msg"]).removeprefix("Value error, ")
        if isinstance(cause, ParamError):  # its message starts with the chat request's name of the field
            msg = msg.removeprefix(f"{cause.param}: ")
        raise InvalidRequest(f"{param}: {msg}" if param else msg, code="invalid_value", param=param) from None


def choice_echo(req: ResponsesRequest) -> str | dict[str, Any]:
    if isinstance(req.tool_choice, FunctionChoice):
        return req.tool_choice.model_dump()
    return req.tool_choice or "auto"
