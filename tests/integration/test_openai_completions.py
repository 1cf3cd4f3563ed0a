"""POST /v1/completions (OpenAI's legacy text route) with the official `openai` SDK, on the fake engine:
the answer's shape streamed and not, echo, legacy logprobs, n, and bad input refused before any job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from tests.procs import Cluster, expected_text, refused
from tokenfan.worker.engines import fake_logprobs, fake_tokens


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    api = cluster.api()
    cluster.worker(TOKENFAN_SLOTS="2")
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def test_a_text_completion_streamed_and_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model="smollm2", prompt="once upon a time", max_tokens=6)
    assert full.object == "text_completion" and full.id
    (choice,) = full.choices
    assert choice.text == expected_text("once upon a time", 6) and choice.finish_reason == "length"
    assert choice.logprobs is None and full.usage is not None and full.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="smollm2", prompt="once upon a time", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert sum(bool(c.choices[0].text) for c in chunks if c.choices) == 6  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    default = client.completions.create(model="smollm2", prompt="the default length")
    assert default.usage is not None and default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_echo_legacy_logprobs_and_n(client: openai.OpenAI) -> None:
    echoed = client.completions.create(model="smollm2", prompt="repeat me", max_tokens=3, echo=True)
    assert echoed.choices[0].text == "repeat me" + expected_text("repeat me", 3)
    streamed = client.completions.create(model="smollm2", prompt="repeat me", max_tokens=3, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text

    toks = fake_tokens([{"role": "user", "content": "scored"}], 4)
    lp = client.completions.create(model="smollm2", prompt="scored", max_tokens=4, logprobs=2).choices[0].logprobs
    assert lp is not None and lp.tokens == toks
    assert lp.token_logprobs == [fake_logprobs(t, i, 2)["logprob"] for i, t in enumerate(toks)]
    assert lp.top_logprobs is not None and all(len(alts) == 2 for alts in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in toks[:i]) for i in range(4)]

    two = client.completions.create(model="smollm2", prompt="twice", max_tokens=3, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.text == expected_text("twice", 3) for c in two.choices)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_bad_completion_input_is_a_400_in_openais_shape_and_no_job(cluster: Cluster, r: redis.Redis,
                                                                  body: dict[str, Any], param: str) -> None:
    api = cluster.api()  # no worker: a job that got through would wait in the queue
    c = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    body = dict(body)
    err = refused(r, lambda: c.completions.create(model="smollm2", prompt=body.pop("prompt"),
                                                  max_tokens=body.pop("max_tokens", 4), extra_body=body))
    c.close()
    assert (err.get("param") or "").startswith(param), err
