"""Tool calls end to end with the official `openai` SDK as the client, on the fake engine (what is ours:
the request's path, the call events, `delta.tool_calls` chunks, the conversation going on with the
`tool` message, bad input refused before any job runs). The fake engine writes its call in the same
text form a model does (shared/tools.py), so the worker's parser reads it as it reads a model's."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import redis

from tests.procs import Cluster, expected_text, refused, sse_events
from tokenfan.shared import structured
from tokenfan.shared import tools as toolcalls
from tokenfan.worker.engines import fake_tokens

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 2},
                                            "days": {"type": "integer", "minimum": 1}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    api = cluster.api()
    cluster.worker()
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def chat(client: openai.OpenAI, messages: list[dict[str, Any]] | str, **kw: Any) -> Any:
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    return client.chat.completions.create(model="smollm2", messages=msgs, **{"max_tokens": 64, **kw})


def test_required_call_streams_as_tool_call_deltas_with_schema_valid_arguments(client: openai.OpenAI) -> None:
    chunks = list(chat(client, "what now", tools=TOOLS, tool_choice="required", stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len(deltas) > 3  # the arguments arrive piece by piece
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.id.startswith("call_") and first.type == "function"
    assert first.function is not None and first.function.name == "get_weather"
    assert all(d.id is None and d.index == 0 for d in rest)
    args = "".join((d.function.arguments or "") for d in deltas if d.function)
    jsonschema.validate(json.loads(args), WEATHER)
    assert json.loads(args) == structured.example(WEATHER)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]


def test_auto_calls_the_tool_then_the_conversation_goes_on_with_its_result(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "use get_time please"}]
    first = chat(client, ask, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "UTC"}
    assert call.id == toolcalls.call_id(first.id, 0, 0)

    follow = [*ask, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "it is noon"}]
    second = chat(client, follow, tools=TOOLS, max_tokens=5)
    want = "".join(fake_tokens([{"role": "tool", "content": "it is noon"}], 5))
    assert second.choices[0].message.content == want and not second.choices[0].message.tool_calls
    assert second.choices[0].finish_reason == "length"


def test_auto_without_a_call_none_and_a_named_function(client: openai.OpenAI) -> None:
    plain = chat(client, "just talk", tools=TOOLS, max_tokens=6)
    assert plain.choices[0].message.content == expected_text("just talk", 6)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    none = chat(client, "get_weather maybe", tools=TOOLS, tool_choice="none", max_tokens=6)
    assert none.choices[0].message.content == expected_text("get_weather maybe", 6)
    named = chat(client, "get_weather maybe", tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and named.choices[0].finish_reason == "tool_calls"


def test_native_events_carry_the_call_and_the_raw_text_behind_it(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 64, "tools": TOOLS,
            "tool_choice": "required"}
    sid = httpx.post(f"{api.url}/v1/streams", json=body, timeout=10).json()["id"]
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        evs = [(e.event, json.loads(e.data)) for e in sse_events(resp)]
    tokens = [d for name, d in evs if name == "token"]
    assert all("tool_call" in d and d["text"] == "" for d in tokens)
    raw = "".join(d["raw"] for d in tokens)
    assert raw.startswith(toolcalls.OPEN) and '"name": "get_weather"' in raw
    done = next(d for name, d in evs if name == "done")
    assert done["finish_reason"] == "tool_calls"


BAD: list[tuple[dict[str, Any], str]] = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"z": {"type": "string", "pattern": "^\\d+$"}}}}}]},
     "tools.0.function.parameters.properties.z.pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]},
     "tools.0.function.parameters.type"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]},
     "messages.0.tool_calls"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tool_input_is_a_400_in_openais_shape_and_no_job(cluster: Cluster, r: redis.Redis,
                                                             extra: dict[str, Any], param: str) -> None:
    api = cluster.api()  # no worker: a job that got through would wait in the queue
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    err = refused(r, lambda: c.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra))
    c.close()
    assert err["param"] == param and err["message"].startswith(param + ":"), err


def test_a_tool_message_without_its_call_id_is_a_400(cluster: Cluster) -> None:
    api = cluster.api()
    resp = httpx.post(f"{api.url}/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]})
    assert resp.status_code == 400 and "tool_call_id" in resp.json()["error"]["message"]


def test_a_call_cut_by_a_killed_worker_goes_on_in_another_exactly_once(cluster: Cluster) -> None:
    """SIGKILL the worker in the middle of a call's arguments: the next worker continues the same text
    (the events' `raw`) under the same grammar, so the client gets one call, whole, with one id."""
    cluster.env.update({"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25"})
    api = cluster.api()
    first = cluster.worker(TOKENFAN_FAKE_RATE="20")
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 64, "tools": TOOLS,
            "tool_choice": "required"}
    sid = httpx.post(f"{api.url}/v1/streams", json=body, timeout=10).json()["id"]
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        for e in sse_events(resp):
            if e.event == "token":
                seen.append(json.loads(e.data))
            if len(seen) >= 4:  # the name and some of the arguments
                break
    first.signal(signal.SIGKILL)
    cluster.worker(TOKENFAN_FAKE_RATE="50")
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}?format=openai", timeout=30) as resp:
        chunks = [json.loads(e.data) for e in sse_events(resp) if e.data != "[DONE]"]
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert [d["id"] for d in deltas if "id" in d] == [toolcalls.call_id(sid, 0, 0)]
    assert {d["index"] for d in deltas} == {0}
    args = "".join(d["function"]["arguments"] for d in deltas)
    assert json.loads(args) == structured.example(WEATHER)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        metas = [json.loads(e.data) for e in sse_events(resp) if e.event == "meta"]
    assert [m["resumed"] for m in metas] == [False, True]  # the second worker took it over
