"""The worker's per-token grammar budget on the real model (issue 27): a grammar that would hold llama.cpp's
matcher for minutes is either served (the grammar first sees only the likeliest tokens, which may be cheap
ones: the model's own text then matches the pattern) or ends its own stream with `grammar_too_slow`; the
stream beside it goes on either way.

The edge refuses these patterns (tests/unit/test_grammar_cost.py); here they reach the engine as if an
older API, or a bound raised too far, had let them through: the worker must hold on its own."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from tokenfan.shared import jsongrammar, structured
from tokenfan.shared.errors import InvalidRequest
from tokenfan.worker import batch
from tokenfan.worker.batch import GrammarTooSlow, LlamaBatchEngine
from tokenfan.worker.engines import GenRequest, bundled_model_path

pytestmark = pytest.mark.model

BUDGET_S = 0.5
# A guard against a hang, not a speed claim: the plain stream's longest wait between two tokens. A step
# holds a decode (about 0.1 s here, more under load) plus, for the costly stream, one budget.
MAX_GAP_S = 20.0
# The patterns (the hundred `[a-z]*` end with letters the model must write: left free, it closes
# the string at once, and its matcher never meets a word), each with a plain regex of the same strings
# to check a served answer with (Python's own matcher backtracks on the originals for minutes, too).
COSTLY = [("^((((a{0,256}){0,256}){0,256}){0,256})$", "a*"), ("^((a{0,256}){0,256})$", "a*"),
          ("^" + "[a-z]*" * 100 + "[a-z]{16}$", "[a-z]{16,}")]


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaBatchEngine]:
    eng = LlamaBatchEngine(bundled_model_path(), n_ctx=512, slots=2, threads=1, n_gpu_layers=0,
                           grammar_budget_s=BUDGET_S)
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def no_stream_left(engine: LlamaBatchEngine) -> Iterator[None]:
    yield
    for key in list(engine.streams):
        engine.drop(key)


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker converts a schema without the edge's bounds, as if they had let it through."""
    monkeypatch.setattr(batch, "_schema_grammar", lambda text, limits: jsongrammar.json_schema_to_gbnf(text))


def ask(content: str, max_tokens: int, **kw: object) -> GenRequest:
    return GenRequest([{"role": "user", "content": content}], max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("pattern", "same"), COSTLY)
def test_a_costly_grammar_ends_its_own_stream_and_the_batch_goes_on(engine: LlamaBatchEngine, unchecked: None,
                                                                    pattern: str, same: str) -> None:
    schema = {"type": "string", "pattern": pattern}
    costly = ""
    engine.admit("plain", ask("Count from one to ten.", 24))
    try:
        engine.admit("costly", ask("Write a long word.", 24, json_schema=schema))
    except GrammarTooSlow as exc:  # llama.cpp's set-up of the grammar alone overran the budget
        assert exc.code == "grammar_too_slow" and not exc.retryable and exc.param == "response_format"
        costly_error: GrammarTooSlow | None = exc
    else:
        costly_error = None
    plain, gaps, last = "", [], time.monotonic()
    deadline = time.monotonic() + 120
    while engine.active() and time.monotonic() < deadline:
        for out in engine.step():
            if out.key == "costly":  # its text so far, then its error or its end
                costly += out.text
                if out.error is not None:
                    assert isinstance(out.error, GrammarTooSlow), out
                    costly_error = out.error
                elif out.finish == "length":  # served in budget, cut by max_tokens: a string still open
                    assert re.fullmatch('"' + re.sub(r"\{\d+,\}$", "*", same), costly), costly
                elif out.finish is not None:
                    assert out.finish == "stop" and re.fullmatch(same, json.loads(costly)), costly
            else:
                assert out.error is None, out.error
                plain += out.text
                now = time.monotonic()
                gaps.append(now - last)
                last = now
    assert not engine.active(), "streams still running after 120 s"
    if costly_error is not None:
        assert costly_error.code == "grammar_too_slow" and not costly_error.retryable
        assert "budget" in costly_error.message and costly_error.param == "response_format"
    assert plain.strip() and max(gaps) < MAX_GAP_S, (max(gaps), plain)


@pytest.mark.parametrize(("pattern", "same"), COSTLY)
def test_the_worker_refuses_what_the_edge_refuses_before_llama_cpp_sees_it(engine: LlamaBatchEngine,
                                                                           pattern: str, same: str) -> None:
    """A job an older API queued: the worker converts with the same bounds, and the stream ends with a
    non-retryable error naming the limit, never walked to the next worker."""
    with pytest.raises(InvalidRequest) as got:
        engine.admit("old", ask("Answer.", 8, json_schema={"type": "string", "pattern": pattern}))
    assert not got.value.retryable and "GRAMMAR_REPEAT_" in got.value.message
    assert not engine.active()


def test_the_worker_checks_a_job_by_its_own_limits(engine: LlamaBatchEngine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's limits are its settings (load_engine passes them): lowered, a schema the defaults
    take ends its stream with a non-retryable error naming the variable."""
    colors = ask("A color.", 8, json_schema={"enum": ["red", "green", "blue"]})
    monkeypatch.setattr(engine, "grammar_limits", structured.Limits(enum_values=2))
    with pytest.raises(InvalidRequest) as got:
        engine.admit("few", colors)
    assert not got.value.retryable and "TOKENFAN_GRAMMAR_ENUM_VALUES" in got.value.message
    monkeypatch.setattr(engine, "grammar_limits", structured.Limits())
    engine.admit("some", colors)
    assert engine.active()


def test_a_cheap_grammar_within_the_budget_is_served(engine: LlamaBatchEngine) -> None:
    schema = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,12}$"}},
              "required": ["word"]}
    engine.admit("json", ask("Answer in JSON: a fruit.", 24, json_schema=schema))
    text = ""
    for _ in range(200):
        for out in engine.step():
            assert out.error is None, out.error
            text += out.text
        if not engine.active():
            break
    assert set(json.loads(text)) == {"word"}, text
