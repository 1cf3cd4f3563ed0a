"""The sampling parameters through the whole path on the real model, the official `openai` SDK as the
client: a streamed answer that is JSON matching its schema, and log probabilities on every chunk."""

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
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="2", TOKENFAN_N_CTX="512", TOKENFAN_SLOTS="2")
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
    client.close()
