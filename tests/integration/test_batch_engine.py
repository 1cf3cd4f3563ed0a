"""The batch engine alone, on the real model: SmolLM2-135M through llama-cpp-python's low-level bindings.

One engine (4 slots of 512 tokens) serves every test of the module; each test
ends with no stream active, so what one leaves behind is only slot caches,
which are what the prefix-reuse tests look at.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tokenfan.shared.errors import ContextLengthExceeded
from tokenfan.worker.batch import PROMPT_CHUNK, LlamaBatchEngine
from tokenfan.worker.engines import GenRequest, Output, bundled_model_path

pytestmark = pytest.mark.model

N_CTX = 512
SLOTS = 4
# Steps after which a test gives up: far more than any of them needs.
MAX_STEPS = 2000


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaBatchEngine]:
    eng = LlamaBatchEngine(bundled_model_path(), n_ctx=N_CTX, slots=SLOTS, threads=1, n_gpu_layers=0)
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def no_stream_left(engine: LlamaBatchEngine) -> Iterator[None]:
    """A failing test must not leave streams that take the next test's slots."""
    yield
    for key in list(engine.streams):
        engine.drop(key)


def ask(content: str, max_tokens: int = 32, **kw: object) -> GenRequest:
    return GenRequest([{"role": "user", "content": content}], max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def run(eng: LlamaBatchEngine, reqs: dict[str, GenRequest]) -> dict[str, tuple[str, str | None, int]]:
    """Admit all, step until every stream (these and any already admitted) ended: each one's text,
    finish reason and count of non-empty pieces."""
    for key, req in reqs.items():
        eng.admit(key, req)
    got: dict[str, list[Output]] = {k: [] for k in reqs}
    for _ in range(MAX_STEPS):
        for out in eng.step():
            assert out.error is None, out.error
            got.setdefault(out.key, []).append(out)
        if not eng.active():
            break
    assert not eng.active(), "streams still running after MAX_STEPS"
    return {k: ("".join(o.text for o in outs), outs[-1].finish, sum(bool(o.text) for o in outs))
            for k, outs in got.items()}


def alone(eng: LlamaBatchEngine, req: GenRequest) -> tuple[str, str | None, int]:
    return run(eng, {"solo": req})["solo"]


PROMPTS = ["Write one sentence about the sea.", "Name three colours.", "What is the capital of France?",
           "Describe a cat in a few words."]


def test_streams_decoded_together_each_give_well_formed_text_that_stops_where_asked(
        engine: LlamaBatchEngine) -> None:
    base = alone(engine, ask(PROMPTS[0], 40, temperature=0))[0]
    words = base.split()
    assert len(words) > 4, base
    stop = " " + words[3]  # a word the answer is known to reach
    reqs = {
        "short": ask(PROMPTS[1], 5, temperature=0),
        "stop": ask(PROMPTS[0], 40, temperature=0, stop=[stop]),
        "sampled": ask(PROMPTS[2], 24, temperature=0.8, seed=7),
        "long": ask(PROMPTS[3], 48, temperature=0),
    }
    res = run(engine, reqs)
    assert res["short"][1] == "length" and res["short"][2] <= 5
    assert res["stop"][1] == "stop" and res["stop"][0] == base[:base.index(stop)]
    for text, finish, pieces in res.values():
        assert finish in ("stop", "length") and pieces >= 1
        assert text.strip() and "\ufffd" not in text and any(c.isalpha() for c in text)


def test_temperature_zero_text_is_the_same_alone_and_in_a_batch(engine: LlamaBatchEngine) -> None:
    """Each stream's logits come from its own KV sequence and its own row of the batch, computed by
    the same kernels whatever the batch's size, so greedy decoding picks the same tokens: the texts
    are asserted equal, not merely similar. (Were two logits ever within float rounding of each other,
    a different ubatch split could flip that one choice; no prompt here comes near that.)"""
    solo = {p: alone(engine, ask(p, 32, temperature=0)) for p in PROMPTS}
    together = run(engine, {p: ask(p, 32, temperature=0) for p in PROMPTS})
    assert together == solo


def test_a_seed_gives_the_same_sampled_text_alone_and_in_a_batch(engine: LlamaBatchEngine) -> None:
    req = ask(PROMPTS[3], 24, temperature=0.9, seed=1234)
    solo = alone(engine, req)
    res = run(engine, {"a": ask(PROMPTS[3], 24, temperature=0.9, seed=1234), "b": ask(PROMPTS[0], 24),
                       "c": ask(PROMPTS[3], 24, temperature=0.9, seed=99)})
    assert res["a"] == solo


def test_a_prompt_longer_than_one_streams_context_fails_alone(engine: LlamaBatchEngine) -> None:
    solo = alone(engine, ask(PROMPTS[0], 16, temperature=0))
    engine.admit("ok", ask(PROMPTS[0], 16, temperature=0))
    head = "".join(o.text for o in engine.step())
    with pytest.raises(ContextLengthExceeded):
        engine.admit("huge", ask("sea " * N_CTX, 8))
    assert "huge" not in engine.streams and engine.active() == 1
    text, finish, _ = run(engine, {})["ok"]
    assert (head + text, finish) == solo[:2]  # the running stream went on to its end, unharmed


def test_generation_ends_with_length_at_the_streams_context(engine: LlamaBatchEngine) -> None:
    for k in range(60, 200):  # a prompt that leaves room for only a few tokens
        prompt = "Count: " + " ".join(str(i) for i in range(k))
        n = engine.prompt_tokens(ask(prompt))
        if n > N_CTX - 12:
            break
    assert N_CTX - 12 < n < N_CTX, n
    _, finish, pieces = run(engine, {"full": ask(prompt, 400, temperature=0)})["full"]
    assert finish in ("length", "stop") and pieces <= N_CTX - n


def test_a_long_prompt_is_fed_in_chunks_while_other_streams_keep_decoding(engine: LlamaBatchEngine) -> None:
    engine.admit("running", ask(PROMPTS[0], 64, temperature=0))
    while not engine.streams["running"].next_token >= 0:
        engine.step()
    long_prompt = "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 45
    adm = engine.admit("long", ask(long_prompt, 4, temperature=0))
    assert adm.prompt_tokens - adm.cached_tokens > PROMPT_CHUNK
    steps = 0
    while engine.streams.get("long") is not None and engine.streams["long"].pending:
        outs = engine.step()
        steps += 1
        assert engine.last.prefill <= PROMPT_CHUNK
        assert engine.last.decode == ("running" in engine.streams)  # the running stream decoded in this step too
        assert all(o.error is None for o in outs)
    assert steps >= 2
    run(engine, {})
    assert not engine.active()


def test_a_dropped_stream_frees_its_slot_at_once(engine: LlamaBatchEngine) -> None:
    for i in range(SLOTS):
        engine.admit(f"d{i}", ask(PROMPTS[i], 64))
    engine.step()
    assert engine.free() == 0
    engine.drop("d2")
    assert engine.free() == 1 and "d2" not in engine.streams
    outs = engine.step()
    assert all(o.key != "d2" for o in outs)
    for i in (0, 1, 3):
        engine.drop(f"d{i}")
    assert engine.free() == SLOTS and not engine.active()


def _chat(turns: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    msgs = []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*msgs, {"role": "user", "content": question}]


def forget(eng: LlamaBatchEngine) -> None:
    """Empty every slot's cache, so the next prompt is decoded whole."""
    for slot in eng.slot_list:
        eng.ll.llama_memory_seq_rm(eng.mem, slot.seq, -1, -1)
        slot.tokens.clear()


def test_the_next_turn_of_a_chat_reuses_its_slots_cached_prefix(engine: LlamaBatchEngine) -> None:
    q1 = "Tell me about lighthouses. " * 8
    first = alone(engine, ask(q1, 48, temperature=0))[0]
    second = GenRequest(_chat([(q1, first)], "And who keeps them?"), max_tokens=24, temperature=0)
    before = engine.prefilled_tokens
    adm = engine.admit("turn2", second)
    assert adm.cached_tokens >= engine.prompt_tokens(ask(q1)) + 20, adm  # the question and most of its answer
    run(engine, {})
    assert engine.prefilled_tokens - before == adm.prompt_tokens - adm.cached_tokens  # only the rest was decoded


def test_an_answer_from_a_reused_prefix_starts_as_the_answer_without_reuse(engine: LlamaBatchEngine) -> None:
    """Not asserted equal: the cached prefix's KV was computed one token per step (the first answer),
    the cold run's in one prompt batch, and llama.cpp's CPU kernels round differently for a batch of
    one row and for many (llama-server's docs say the same of its `cache_prompt`). Measured here, the
    two greedy answers agree for about a dozen tokens, then may part; both must be a sound answer."""
    q1 = "Explain what a river delta is."
    first = alone(engine, ask(q1, 40, temperature=0))[0]
    second = GenRequest(_chat([(q1, first)], "Name one famous delta."), max_tokens=24, temperature=0)
    warm_adm = engine.admit("warm", second)
    warm = run(engine, {})["warm"]
    forget(engine)
    cold_adm = engine.admit("cold", second)
    cold = run(engine, {})["cold"]
    assert warm_adm.cached_tokens > 20 and cold_adm.cached_tokens == 0
    assert warm[0].split()[:4] == cold[0].split()[:4], (warm, cold)
    assert warm[1] in ("stop", "length") and "\ufffd" not in warm[0]
