"""A real-model worker with several slots: streams decoded together in one process, a prompt longer
than one stream's context failing alone."""

from __future__ import annotations

import pytest

from tests.procs import Cluster, create_stream, logged, read_stream

pytestmark = pytest.mark.model


def test_real_model_worker_serves_several_streams_and_a_too_long_prompt_fails_alone(cluster: Cluster) -> None:
    api = cluster.api()
    w = cluster.worker(TOKENFAN_ENGINE="llama", TOKENFAN_THREADS="1", TOKENFAN_N_CTX="256", TOKENFAN_SLOTS="3")
    good = [create_stream(api.url, q, max_tokens=16, temperature=0)
            for q in ("Write one sentence about the sea.", "Name three colours.")]
    huge = create_stream(api.url, "sea " * 400, max_tokens=8)
    evs = logged(read_stream(api.url, huge, timeout=120)[1])
    assert evs[-1].event == "error" and evs[-1].json()["code"] == "context_length_exceeded"
    for sid in good:
        evs = logged(read_stream(api.url, sid, timeout=120)[1])
        assert [int(e.id) for e in evs] == list(range(1, len(evs) + 1))
        assert evs[-1].event == "done" and evs[-1].json()["finish_reason"] in ("stop", "length")
        text = "".join(e.json()["text"] for e in evs if e.event == "token")
        assert text.strip() and "\ufffd" not in text
        assert evs[0].json()["worker"] == w.name
