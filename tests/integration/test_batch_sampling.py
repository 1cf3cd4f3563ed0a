"""The sampling parameters of issue 13 on the real model (SmolLM2-135M through the batch engine): what
is the model's to do. JSON that matches its schema, log probabilities that are log probabilities,
logit_bias and the penalties changing what greedy decoding picks, and a stream that asked for none of
them unchanged beside one that asked for all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from tests.unit.test_structured import GOOD, PERSON
from tokenfan.shared import structured
from tokenfan.worker.batch import LlamaBatchEngine
from tokenfan.worker.engines import GenRequest, Output, bundled_model_path

pytestmark = pytest.mark.model

N_CTX = 512
MAX_STEPS = 2000
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"},
                                          "label": {"type": "string", "enum": ["start", "end"]}},
         "required": ["x", "y", "label"]}


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaBatchEngine]:
    eng = LlamaBatchEngine(bundled_model_path(), n_ctx=N_CTX, slots=3, threads=1, n_gpu_layers=0)
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def no_stream_left(engine: LlamaBatchEngine) -> Iterator[None]:
    yield
    for key in list(engine.streams):
        engine.drop(key)


def ask(content: str, max_tokens: int = 48, **kw: Any) -> GenRequest:
    return GenRequest([{"role": "user", "content": content}], max_tokens=max_tokens, **kw)


def run(eng: LlamaBatchEngine, reqs: dict[str, GenRequest]) -> dict[str, list[Output]]:
    for key, req in reqs.items():
        eng.admit(key, req)
    got: dict[str, list[Output]] = {k: [] for k in reqs}
    for _ in range(MAX_STEPS):
        for out in eng.step():
            assert out.error is None, out.error
            got[out.key].append(out)
        if not eng.active():
            return got
    raise AssertionError("streams still running after MAX_STEPS")


def text(outs: list[Output]) -> str:
    return "".join(o.text for o in outs)


def test_json_answers_match_their_schemas_greedy_sampled_and_beside_a_plain_stream(
        engine: LlamaBatchEngine) -> None:
    plain = ask("Name three colours.", 24, temperature=0)
    alone = text(run(engine, {"p": plain})["p"])
    res = run(engine, {
        "person": ask("Describe a person as JSON.", 96, temperature=0, json_schema=PERSON),
        "point": ask("Give a point.", 64, temperature=0.9, seed=5, json_schema=POINT),
        "plain": ask("Name three colours.", 24, temperature=0),
    })
    for key, schema in (("person", PERSON), ("point", POINT)):
        assert res[key][-1].finish == "stop", text(res[key])
        jsonschema.validate(json.loads(text(res[key])), schema)
    assert text(res["plain"]) == alone  # a neighbour's grammar changes nothing of this stream


def test_json_object_is_any_json_object(engine: LlamaBatchEngine) -> None:
    outs = run(engine, {"o": ask("Reply in JSON with your name.", 128, temperature=0,
                                 json_schema=dict(structured.JSON_OBJECT))})["o"]
    body = text(outs)
    assert body.lstrip().startswith("{")
    if outs[-1].finish == "stop":  # it may also run to max_tokens inside a long string
        assert isinstance(json.loads(body), dict)


def test_a_continued_json_stream_goes_on_from_the_text_already_sent(engine: LlamaBatchEngine) -> None:
    req = ask("Give a point.", 64, temperature=0, json_schema=POINT)
    whole = text(run(engine, {"a": req})["a"])
    head = whole[:len(whole) // 2]
    cont = ask("Give a point.", 64, temperature=0, json_schema=POINT, prefix=head, prefix_tokens=5)
    rest = run(engine, {"b": cont})["b"]
    assert rest[-1].finish == "stop"
    jsonschema.validate(json.loads(head + text(rest)), POINT)


def test_logprobs_are_log_probabilities_with_the_asked_alternatives(engine: LlamaBatchEngine) -> None:
    outs = run(engine, {"g": ask("Say hello.", 12, temperature=0, logprobs=5),
                        "s": ask("Say hello.", 12, temperature=0.8, seed=3, logprobs=0)})
    for key, top in (("g", 5), ("s", 0)):
        entries = [lp for o in outs[key] for lp in o.logprobs or []]
        assert len(entries) >= len([o for o in outs[key] if o.text])
        assert "".join(e["token"] for e in entries).startswith(text(outs[key])[:4])
        for e in entries:
            assert e["logprob"] <= 0 and bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
            alts = e["top_logprobs"]
            assert len(alts) == top and all(a["logprob"] <= 0 for a in alts)
            assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
            if key == "g":  # greedy takes the likeliest token
                assert alts[0]["token"] == e["token"] and alts[0]["logprob"] == pytest.approx(e["logprob"])
    assert all(o.logprobs is None for o in run(engine, {"n": ask("Say hello.", 6)})["n"])


def test_logit_bias_bans_the_greedy_first_token(engine: LlamaBatchEngine) -> None:
    first = run(engine, {"a": ask("Say hello.", 4, temperature=0, logprobs=0)})["a"]
    tok = engine.tokenize(first[0].logprobs[0]["token"], add_special=False)  # type: ignore[index]
    assert len(tok) == 1
    banned = run(engine, {"b": ask("Say hello.", 4, temperature=0, logit_bias={tok[0]: -100.0})})["b"]
    assert not text(banned).startswith(first[0].text), (text(first), text(banned))


def _most_repeated(outs: list[Output]) -> int:
    """How often the answer's commonest token occurs."""
    toks = [lp["token"] for o in outs for lp in o.logprobs or []]
    return max(toks.count(t) for t in toks)


def test_the_penalties_break_a_repeating_greedy_answer(engine: LlamaBatchEngine) -> None:
    prompt = "Count from 1 to 40."
    base = run(engine, {"a": ask(prompt, 40, temperature=0, logprobs=0)})["a"]
    assert _most_repeated(base) >= 4, text(base)  # greedy repeats the digits' tokens
    pen = run(engine, {"b": ask(prompt, 40, temperature=0, logprobs=0, frequency_penalty=2.0,
                                presence_penalty=2.0)})["b"]
    assert text(pen) != text(base) and _most_repeated(pen) < _most_repeated(base), (text(base), text(pen))


@pytest.mark.parametrize("schema", GOOD)
def test_llama_cpp_parses_every_grammar_the_api_accepts(engine: LlamaBatchEngine, schema: dict[str, Any]) -> None:
    smpl = engine._grammar(schema)
    assert smpl
    engine.ll.llama_sampler_free(smpl)


def test_n_greedy_choices_share_the_prompt_and_each_is_the_answer_alone(engine: LlamaBatchEngine) -> None:
    """The prompt is decoded once and its KV cells copied into the other choices' slots: were the copy
    wrong, their greedy answers would differ from the one computed alone."""
    alone = text(run(engine, {"a": ask("Write one sentence about the sea.", 24, temperature=0)})["a"])
    before = engine.prefilled_tokens
    outs = run(engine, {"n": ask("Write one sentence about the sea.", 24, temperature=0, n=3)})["n"]
    by = {i: "".join(o.text for o in outs if o.index == i) for i in range(3)}
    assert by == {0: alone, 1: alone, 2: alone}
    assert {o.index for o in outs if o.finish} == {0, 1, 2}
    prompt = engine.prompt_tokens(ask("Write one sentence about the sea."))
    assert engine.prefilled_tokens - before <= prompt  # the prompt once, not three times


def test_n_sampled_choices_differ_and_the_slots_free_at_the_end(engine: LlamaBatchEngine) -> None:
    outs = run(engine, {"s": ask("Give a point.", 64, temperature=1.0, seed=9, n=3, json_schema=POINT)})["s"]
    by = {i: "".join(o.text for o in outs if o.index == i) for i in range(3)}
    ends = {o.index: o.finish for o in outs if o.finish}
    assert set(ends) == {0, 1, 2}
    for i, t in by.items():
        if ends[i] == "stop":  # a sampled integer may run on to max_tokens
            jsonschema.validate(json.loads(t), POINT)
    assert "stop" in ends.values(), by
    assert len(set(by.values())) > 1, by
    assert engine.free() == engine.slots
