from __future__ import annotations

import time

import pytest

from tokenfan.shared.errors import ContextLengthExceeded, EngineError
from tokenfan.worker.engines import FakeEngine, GenRequest, fake_tokens

MSG = [{"role": "user", "content": "say <b>this</b> please"}]


def test_fake_tokens_echo_then_fill_deterministically() -> None:
    toks = fake_tokens(MSG, 6)
    assert toks[:3] == ["say", " <b>this</b>", " please"]
    assert len(toks) == 6 and toks == fake_tokens(MSG, 6)


def test_generate_yields_expected_pieces_and_finish_reason() -> None:
    eng = FakeEngine(rate=0, length=5, n_ctx=100)
    pieces = list(eng.generate(GenRequest(MSG, max_tokens=10)))
    assert [t for t, _ in pieces] == fake_tokens(MSG, 5)
    assert [f for _, f in pieces] == [None] * 4 + ["stop"]
    pieces = list(eng.generate(GenRequest(MSG, max_tokens=3)))
    assert pieces[-1][1] == "length" and len(pieces) == 3


def test_continuation_starts_after_prefix() -> None:
    eng = FakeEngine(rate=0, length=8, n_ctx=100)
    rest = [t for t, _ in eng.generate(GenRequest(MSG, max_tokens=8, prefix_tokens=5))]
    assert rest == fake_tokens(MSG, 8)[5:]


def test_rate_paces_tokens() -> None:
    eng = FakeEngine(rate=100, length=10, n_ctx=100)
    t0 = time.monotonic()
    list(eng.generate(GenRequest(MSG, max_tokens=10)))
    assert time.monotonic() - t0 >= 0.09


def test_failure_and_context_errors() -> None:
    with pytest.raises(EngineError):
        list(FakeEngine(0, 10, 100, fail_after=2).generate(GenRequest(MSG, max_tokens=10)))
    with pytest.raises(ContextLengthExceeded):
        FakeEngine(0, 10, n_ctx=4).prompt_tokens(GenRequest([{"role": "user", "content": "x" * 100}], 5))
