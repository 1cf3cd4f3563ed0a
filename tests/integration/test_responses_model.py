"""The Responses API on the real model: SmolLM2-135M through llama-cpp-python in a real worker."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.model


def test_real_model_answers_a_plain_response_with_text(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.responses.create(input="Write one sentence about the sea.", instructions="Answer in English.",
                                   max_output_tokens=24, temperature=0)
    assert resp.status in ("completed", "incomplete") and resp.error is None
    text = resp.output_text
    assert len(text.strip()) >= 10 and any(c.isalpha() for c in text)
    assert resp.usage is not None and resp.usage.input_tokens > 5 and 0 < resp.usage.output_tokens <= 24
    assert client.responses.retrieve(resp.id).output_text == text


def test_real_model_calls_a_required_tool_with_arguments_that_match_its_schema(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    weather = {"type": "object", "properties": {"city": {"type": "string", "minLength": 2, "maxLength": 20},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}
    evs = list(client.responses.create(
        input="What is the weather in Paris for the next 3 days?", max_output_tokens=200, temperature=0, stream=True,
        parallel_tool_calls=False,
        tools=[{"type": "function", "name": "get_weather", "description": "The forecast", "parameters": weather}],
        tool_choice="required"))
    final = evs[-1].response
    assert final.status == "completed", final
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    args = json.loads(call.arguments)
    jsonschema.validate(args, weather)  # the grammar held the model to the schema
    streamed = "".join(e.delta for e in evs if e.type == "response.function_call_arguments.delta")
    assert streamed == call.arguments
