"""The chat sampling parameters end to end with the official `openai` SDK as the client, on the fake
engine (what is ours: the request's path, the event contract, the chunks' shape, bad input refused
before any job runs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
import redis

from tests.procs import Cluster, expected_text, refused
from tokenfan.worker.engines import fake_logprobs, fake_tokens

PERSON = {"type": "object", "properties": {"name": {"type": "string", "minLength": 2},
                                           "age": {"type": "integer", "minimum": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    api = cluster.api()
    cluster.worker()
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def chat(client: openai.OpenAI, content: str, **kw: Any) -> Any:
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": content}], **kw)


def test_json_object_and_json_schema_answers_are_json_streamed_or_not(client: openai.OpenAI) -> None:
    full = chat(client, "give me json", max_tokens=64, response_format={"type": "json_object"})
    assert json.loads(full.choices[0].message.content or "") == {"answer": "give me json"}
    assert full.choices[0].finish_reason == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chunks = list(chat(client, "a person", max_tokens=64, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert sum(bool(c.choices[0].delta.content) for c in chunks if c.choices) > 3  # token by token
    cut = chat(client, "a person", max_tokens=2, response_format=fmt)
    assert cut.choices[0].finish_reason == "length"


def test_logprobs_ride_on_every_chunk_and_on_the_final_message(client: openai.OpenAI) -> None:
    content = "logprobs please"
    toks = fake_tokens([{"role": "user", "content": content}], 6)
    want = [fake_logprobs(t, i, 2) for i, t in enumerate(toks)]
    chunks = list(chat(client, content, max_tokens=6, logprobs=True, top_logprobs=2, stream=True))
    got = [lp.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
           for lp in c.choices[0].logprobs.content or []]
    assert got == want
    full = chat(client, content, max_tokens=6, logprobs=True, top_logprobs=2)
    assert full.choices[0].logprobs is not None
    assert [lp.model_dump() for lp in full.choices[0].logprobs.content or []] == want
    plain = chat(client, content, max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == expected_text(content, 6)
    # the cap: 20 alternatives a token, each of them there
    most = chat(client, content, max_tokens=3, logprobs=True, top_logprobs=20)
    assert most.choices[0].logprobs is not None
    assert [len(lp.top_logprobs) for lp in most.choices[0].logprobs.content or []] == [20, 20, 20]


def test_penalties_logit_bias_seed_stop_and_user_are_accepted(client: openai.OpenAI) -> None:
    full = chat(client, "accepted", max_tokens=5, presence_penalty=1.5, frequency_penalty=-0.5,
                logit_bias={"42": -100, "7": 3.5}, seed=11, stop=["zzz"], user="someone")
    assert full.choices[0].message.content == expected_text("accepted", 5)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"zip": {"type": "string", "pattern": "^\\d{5}$"}}}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "maxLength": 10**9}}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"n": 5}, "n"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_sampling_input_is_a_400_in_openais_shape_and_no_job(cluster: Cluster, r: redis.Redis,
                                                                 extra: dict[str, Any], param: str) -> None:
    api = cluster.api()  # no worker: a job that got through would wait in the queue
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    err = refused(r, lambda: c.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra))
    c.close()
    assert (err.get("param") or "").startswith(param), err
    if '"schema":' in json.dumps(extra):
        assert "schema." in err["message"], err  # the message names the part of the schema


def test_n_choices_each_with_its_index_streamed_and_not(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_SLOTS="4")
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    content = "several answers"
    full = chat(c, content, max_tokens=5, n=3, logprobs=True)
    assert [ch.index for ch in full.choices] == [0, 1, 2]
    for ch in full.choices:
        assert ch.message.content == expected_text(content, 5) and ch.finish_reason == "length"
        assert ch.logprobs is not None and len(ch.logprobs.content or []) == 5
    assert full.usage is not None and full.usage.completion_tokens == 15
    chunks = list(chat(c, content, max_tokens=4, n=2, stream=True))
    texts = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks
                        if ch.choices and ch.choices[0].index == i) for i in (0, 1)}
    assert texts == {0: expected_text(content, 4), 1: expected_text(content, 4)}
    roles = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role]
    finals = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert sorted(roles) == [0, 1] and sorted(finals) == [0, 1]
    c.close()


def test_n_over_the_workers_slots_ends_the_stream_with_a_clear_error(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_SLOTS="2")
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as got:
        chat(c, "too many", max_tokens=3, n=3)
    assert "slots" in str(got.value)
    assert chat(c, "fine", max_tokens=3, n=2).choices[1].message.content == expected_text("fine", 3)
    c.close()
