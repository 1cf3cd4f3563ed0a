"""The Responses API's input items, text formats and tools, and the chat messages they make."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

from tokenfan.shared.errors import InvalidRequest
from tokenfan.shared.schema import Bool, Role, Text


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text"]
    text: Text


class InputMessage(BaseModel):
    """A message item: `{"role", "content"}` (EasyInputMessage) or the same with `"type": "message"`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Role
    content: Text | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made in an earlier turn (the `function_call` output item, given back)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: Annotated[Text, Field(min_length=1, max_length=128)]
    name: Text
    arguments: Text

    def text(self) -> str:
        return ""

    def chat_call(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class FunctionCallOutput(BaseModel):
    """A tool's result, answering the call `call_id`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: Annotated[Text, Field(min_length=1, max_length=128)]
    output: Text | list[ContentPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(v: Any) -> str:
    """An item's type: a message item may leave it out (EasyInputMessage)."""
    return str(v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message"))


# Tagged by type, so an error names the item's field (`input.0.role`), not every member it tried.
InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutput, Tag("function_call_output")],
                      Discriminator(_item_type, custom_error_type="invalid_item_type", custom_error_message=(
                          "an input item's type is message, function_call or function_call_output"))]

ITEM: TypeAdapter[InputItem] = TypeAdapter(InputItem)


def chat_messages(items: list[InputItem], known_calls: set[str] | None = None, check: bool = True
                  ) -> list[dict[str, Any]]:
    """The chat messages of input items: consecutive calls are one assistant message's tool_calls (with
    the assistant's text before them, if any), a call's output a tool message. An output whose call_id
    no call before it (here or in `known_calls`) has is a 400 naming it."""
    calls = set(known_calls or ())
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(item.chat_call())
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [item.chat_call()]})
        else:
            if check and item.call_id not in calls:
                raise InvalidRequest(f"input.{i}.call_id: no function_call before this output has call_id "
                                     f"'{item.call_id[:128]}'", code="invalid_value", param=f"input.{i}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return out


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_schema", "json_object"]
    name: Text | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    description: Text | None = None
    strict: Bool | None = None

    def response_format(self) -> dict[str, Any] | None:
        """The chat request's `response_format` for this format (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec = {"name": self.name or "response", "schema": self.json_schema, "description": self.description,
                "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}

    def echo(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class FunctionTool(BaseModel):
    """A Responses function tool: the chat tool's `function`, flat (`{"type", "name", "parameters", ...}`)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None

    def chat(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: Text


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat | None = None
