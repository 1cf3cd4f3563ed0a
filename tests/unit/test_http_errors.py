"""Starlette's own HTTP errors (unknown route, wrong method) leave the API as
our error classes, in OpenAI's shape, with the class's status. No lifespan
runs here: routing answers these before any route (or Redis) is reached."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tokenfan.api.app import create_app
from tokenfan.shared.errors import MethodNotAllowed, NotFound, TokenfanError
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
