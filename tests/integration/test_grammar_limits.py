"""The grammar limits are settings (issue 27): an API started with a lowered limit refuses, with a 400
naming the variable, what the default API serves, on every route that takes a schema; one started with a
raised limit serves what the default refuses, through a Responses request's own chat request too."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.procs import Cluster

COLORS = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "cyan", "pink"]}},
          "required": ["color"]}
WIDE = {"type": "object", "properties": {"code": {"enum": list(range(513))}}, "required": ["code"]}  # default: 512


def _chat(base: str, schema: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "A color."}], "max_tokens": 16,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})


def _tools(base: str, schema: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Paint."}], "max_tokens": 16,
        "tools": [{"type": "function", "function": {"name": "paint", "parameters": schema}}]})


def _responses(base: str, schema: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}/v1/responses", timeout=60, json={
        "model": "smollm2", "input": "A color.", "max_output_tokens": 16,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}})


def test_a_lowered_limit_is_a_400_naming_it_where_the_default_serves(cluster: Cluster) -> None:
    default, lowered = cluster.api(), cluster.api(TOKENFAN_GRAMMAR_ENUM_VALUES="4")
    cluster.worker()
    for send in (_chat, _tools, _responses):
        got = send(lowered.url, COLORS)
        assert got.status_code == 400, (send.__name__, got.text)
        err = got.json()["error"]
        assert "TOKENFAN_GRAMMAR_ENUM_VALUES" in err["message"] and "at most 4" in err["message"], err
        assert "color" in json.dumps(err), err
        served = send(default.url, COLORS)
        assert served.status_code == 200, (send.__name__, served.text)
    answer = _chat(default.url, COLORS).json()["choices"][0]["message"]["content"]
    assert json.loads(answer) == {"color": "red"}


def test_a_raised_limit_serves_what_the_default_refuses(cluster: Cluster) -> None:
    default, raised = cluster.api(), cluster.api(TOKENFAN_GRAMMAR_ENUM_VALUES="600")
    cluster.worker()
    for send in (_chat, _responses):
        refused = send(default.url, WIDE)
        assert refused.status_code == 400 and "TOKENFAN_GRAMMAR_ENUM_VALUES" in refused.text, refused.text
        got = send(raised.url, WIDE)
        assert got.status_code == 200, (send.__name__, got.text)
