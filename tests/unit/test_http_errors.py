"""Starlette's own HTTP errors (unknown route, wrong method) leave the API as
our error classes, in OpenAI's shape, with the class's status. No lifespan
runs here: routing answers these before any route (or Redis) is reached."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tokenfan.api.app import create_app
from tokenfan.api.errors import _field_path
from tokenfan.shared.errors import MethodNotAllowed, NotFound, TokenfanError
from tokenfan.shared.schema import ChatRequest
from tokenfan.shared.settings import ApiSettings


@pytest.mark.parametrize(("method", "path", "cls"), [
    ("GET", "/no/such/route", NotFound),
    ("PUT", "/v1/chat/completions", MethodNotAllowed),
])
def test_routing_errors_are_our_classes(method: str, path: str, cls: type[TokenfanError]) -> None:
    resp = TestClient(create_app(ApiSettings())).request(method, path)
    err = resp.json()["error"]
    assert resp.status_code == cls.status
    assert (err["code"], err["type"], err["param"]) == (cls.code, cls.type, None) and err["message"]



@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": 5}, "messages.0.content"),
    ({"role": "tool", "content": "42"}, "messages.0.tool_call_id"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
     "messages.0.tool_calls.0.function"),
])
def test_a_bad_message_names_its_field_not_the_role_pydantic_chose(message: dict[str, object], param: str) -> None:
    # The location as FastAPI reports it (under "body"), through the handler's own reduction.
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({"messages": [message]})
    deepest = max(caught.value.errors(), key=lambda e: len(e["loc"]))
    assert ".".join(_field_path(("body", *deepest["loc"]))) == param
