"""The sampling parameters through the whole path on the real model, the official `openai` SDK as the
client: a streamed answer that is JSON matching its schema, log probabilities on every chunk, and n=2."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.model

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                         "price": {"type": "number"}, "in_stock": {"type": "boolean"}},
        "required": ["name", "price", "in_stock"], "additionalProperties": False}


def test_real_model_json_schema_and_logprobs_through_the_openai_sdk(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1", TOKENFAN_N_CTX="512", TOKENFAN_SLOTS="2")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe a shop item as JSON."}],
        max_tokens=96, temperature=0, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"], text
    jsonschema.validate(json.loads(text), ITEM)

    full = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=10,
        temperature=0.7, seed=2, logprobs=True, top_logprobs=3)
    lps = full.choices[0].logprobs
    assert lps is not None and lps.content
    assert "".join(t.token for t in lps.content).startswith((full.choices[0].message.content or "")[:3])
    for t in lps.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert all(a.logprob <= 0 for a in t.top_logprobs)

    # n=2 on the model: two choices from one prompt (greedy: the same answer twice), streamed and not
    messages = [{"role": "user", "content": "Name a colour."}]
    two = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    answers = [c.message.content or "" for c in two.choices]
    assert answers[0].strip() and answers[0] == answers[1], answers
    streamed: dict[int, str] = {0: "", 1: ""}
    ends: dict[int, str] = {}
    for c in client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                            n=2, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                ends[ch.index] = ch.finish_reason
    assert streamed == {0: answers[0], 1: answers[1]} and set(ends) == {0, 1}
    client.close()


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now"}}]


def test_real_model_tool_calls_streamed_valid_then_auto_and_the_tool_result(cluster: Cluster) -> None:
    """The model's call under the tools' grammar: a tool of the request, arguments valid for its schema,
    streamed as delta.tool_calls, one call and the end when parallel_tool_calls is false (this small model,
    left to it, calls the same tool again and again); with "auto" the answer is either a whole call or
    text; the conversation goes on with the tool's result."""
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1", TOKENFAN_N_CTX="1024", TOKENFAN_SLOTS="2")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=ask, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"], [d.model_dump() for d in deltas]
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
        if d.function is not None:
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    assert len(calls) == 1 and all(c["name"] in ("get_weather", "get_time") for c in calls.values())
    for c in calls.values():
        if c["name"] == "get_weather":
            jsonschema.validate(json.loads(c["arguments"]), WEATHER)
        else:
            assert json.loads(c["arguments"]) == {}

    auto = client.chat.completions.create(model="smollm2", messages=ask, tools=TOOLS,  # type: ignore[arg-type]
                                          max_tokens=60, temperature=0)
    msg = auto.choices[0].message
    if msg.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        for call in msg.tool_calls:
            assert call.function.name in ("get_weather", "get_time")
            json.loads(call.function.arguments)
    else:
        assert msg.content and auto.choices[0].finish_reason in ("stop", "length")

    follow = [*ask, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    after = client.chat.completions.create(model="smollm2", messages=follow, tools=TOOLS,  # type: ignore[arg-type]
                                           tool_choice="none", max_tokens=40, temperature=0)
    assert after.choices[0].message.content and not after.choices[0].message.tool_calls
    client.close()


def test_real_model_text_completion_goes_on_from_the_raw_prompt(cluster: Cluster) -> None:
    """/v1/completions feeds the prompt as it is (no chat template): greedy text is the same streamed and
    not, and never holds the template's markers."""
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1", TOKENFAN_N_CTX="512", TOKENFAN_SLOTS="2")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "The three primary colors are red,"
    full = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    text = full.choices[0].text
    assert text.strip() and "<|im_start|>" not in text and full.choices[0].finish_reason in ("length", "stop")
    lp = full.choices[0].logprobs
    assert lp is not None and lp.tokens and "".join(lp.tokens) == text
    assert all(v is not None and v <= 0 for v in lp.token_logprobs or [])
    streamed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert full.usage is not None and full.usage.prompt_tokens < 16  # the prompt alone, no template around it
    client.close()
