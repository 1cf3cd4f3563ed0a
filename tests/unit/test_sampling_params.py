"""The chat sampling parameters of issue 13 at the edge: validation, the job payload, the chunks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from tests.procs import parse_sse
from tokenfan.api.formats import OpenAIWriter, completion
from tokenfan.shared.events import Done, FinishReason, Meta, Token
from tokenfan.shared.schema import ChatRequest, JobPayload
from tokenfan.shared.settings import ApiSettings
from tokenfan.worker.engines import FakeEngine, GenRequest, fake_logprobs, fake_tokens

MSGS = [{"role": "user", "content": "hello json"}]


def req(**kw: Any) -> ChatRequest:
    return ChatRequest.model_validate({"messages": MSGS, **kw})


def payload(r: ChatRequest) -> JobPayload:
    return JobPayload.from_request(r, stream_id="s" * 20, model="m", settings=ApiSettings(), now=1.0)


@pytest.mark.parametrize(("body", "loc"), [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, ""),
    ({"logprobs": "yes"}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema"),
])
def test_bad_sampling_parameters_are_refused_naming_the_field(body: dict[str, Any], loc: str) -> None:
    with pytest.raises(ValidationError) as got:
        req(**body)
    locs = {".".join(str(p) for p in e["loc"]) for e in got.value.errors()}
    assert loc in locs or any(x.startswith(loc) for x in locs), locs


def test_a_bad_schema_error_names_the_part_of_the_schema() -> None:
    bad = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^\\d{5}$"}}}
    with pytest.raises(ValidationError) as got:
        req(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    assert "schema.properties.zip.pattern" in str(got.value)


def test_the_payload_carries_what_was_asked_and_nothing_when_nothing_was() -> None:
    plain = payload(req()).dump()
    assert not {"json_schema", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"} & set(plain)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    asked = payload(req(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                        logprobs=True, top_logprobs=4, presence_penalty=0.5, frequency_penalty=-1,
                        logit_bias={"42": -100}, user="u1")).dump()
    assert asked["json_schema"] == schema and asked["logprobs"] == 4
    assert asked["presence_penalty"] == 0.5 and asked["frequency_penalty"] == -1.0
    assert asked["logit_bias"] == {"42": -100.0}
    assert JobPayload.model_validate(asked).logprobs == 4  # the worker reads back what the API wrote
    assert payload(req(response_format={"type": "json_object"})).json_schema == {"type": "object"}
    assert payload(req(response_format={"type": "text"})).json_schema is None
    assert payload(req(logprobs=True)).logprobs == 0
    assert payload(req(logprobs=False)).logprobs is None


def _lp(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}


def test_chunks_and_the_final_message_carry_openai_shaped_logprobs() -> None:
    done = Done(4, FinishReason.STOP, ts=1.0)
    evs = [Meta(1, "s", "m", "w", 1.0, False, ts=1.0),
           Token(2, "Hi", logprobs=[_lp("Hi")], ts=1.0),
           Token(3, " you", logprobs=[_lp(" yo"), _lp("u")], ts=1.0),
           done]
    frames = parse_sse(OpenAIWriter("s", "m", 1, False).write(evs))
    chunks = [orjson.loads(f.data) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["logprobs"] is None
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [_lp("Hi")], "refusal": None}
    assert [c["token"] for c in chunks[2]["choices"][0]["logprobs"]["content"]] == [" yo", "u"]
    body = completion("s", "m", 1, "Hi you", done, [_lp("Hi"), _lp(" yo"), _lp("u")])
    assert [c["token"] for c in body["choices"][0]["logprobs"]["content"]] == ["Hi", " yo", "u"]
    assert completion("s", "m", 1, "Hi", done)["choices"][0]["logprobs"] is None


def test_the_fake_engine_gives_deterministic_logprobs_only_when_asked() -> None:
    eng = FakeEngine(rate=0, length=6, n_ctx=100)
    key = "k"
    eng.admit(key, GenRequest(MSGS, max_tokens=6, logprobs=3))
    outs = []
    while key in eng.streams:
        outs += eng.step()
    toks = fake_tokens(MSGS, 6)
    assert [o.logprobs for o in outs] == [[fake_logprobs(t, i, 3)] for i, t in enumerate(toks)]
    for o in outs:
        lp = o.logprobs[0] if o.logprobs else {}
        alts = [a["logprob"] for a in lp["top_logprobs"]]
        assert lp["logprob"] <= 0 and len(alts) == 3 and alts == sorted(alts, reverse=True)
    eng.admit(key, GenRequest(MSGS, max_tokens=3))
    assert all(o.logprobs is None for o in eng.step())
