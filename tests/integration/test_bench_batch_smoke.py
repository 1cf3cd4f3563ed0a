"""Scenario 6 (`batch`) end to end at its `--quick` sizes, with a peer that needs no build.

The real peer, llama.cpp's llama-server, is compiled from llama-cpp-python's
source the first time (bench/peer.py): about 23 CPU-minutes, past what a
clean CI machine should spend on one smoke test. So this test runs every
step of the scenario (the tokenfan API and worker with `--slots`, the
alternating rounds on the same client code, the figures, the targets, the
Markdown table) against llama-cpp-python's OpenAI server, which speaks the
same route and ships with the package, and checks figures for sanity only,
never against the targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tokenfan.bench import main as bench
from tokenfan.bench import report
from tokenfan.bench.batch import batch_versus_server
from tokenfan.bench.peer import LlamaCppPythonServer
from tokenfan.bench.procs import Stack


def _ordered(s: dict[str, Any]) -> None:
    assert s["count"] > 0
    assert 0 < s["min"] <= s["p50"] <= s["p95"] <= s["max"]


@pytest.mark.model
def test_batch_scenario_smoke(tmp_path: Path) -> None:
    plan = bench.batch_plan(bench.QUICK)
    with Stack() as stack:
        result = batch_versus_server(stack, [bench.default_threads()], plan, LlamaCppPythonServer())
    assert result["sides"] == ["tokenfan", "llama_cpp.server"] and result["batching"] is False
    for run in result["runs"]:
        cells = {(row["side"], row["clients"]) for row in run["rows"]}
        assert cells == {(side, c) for side in result["sides"] for c in plan.levels}
        for row in run["rows"]:
            assert row["broken"] == 0 and row["failed"] == 0, row
            assert row["requests"] == plan.rounds * row["clients"] * plan.per_client(row["clients"])
            assert row["tokens"] > 0 and row["tokens_per_s"] > 0
            _ordered(row["ttft_ms"])
            assert 0 < row["rss_mib"] <= row["peak_rss_mib"]
        assert [r["clients"] for r in run["ratios"]] == list(plan.levels)
        assert all(r["tokens_pct"] > 0 and r["ttft_p95_x"] > 0 for r in run["ratios"])
        assert run["same_text_alone"] is True  # temperature 0, one stream: both sides write the same answer
    assert len(result["targets"]) == 2 * len(result["runs"])
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    # the figures go through the report code as a real run's do
    entry = {"command": "tokenfan bench batch --quick", "run_started": "now", "started": "now", "seconds": 1.0,
             "quick": True, "load_average": [0.0, 0.0], "machine": report.machine(), "result": result}
    doc = report.merge_json(tmp_path / "results.json", {"batch": entry})
    report.write_markdown(tmp_path / "benchmarks.md", doc, None)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "### 6. Batching" in text and "| batch | aggregate tokens/s vs llama_cpp.server's" in text
    assert orjson.loads((tmp_path / "results.json").read_bytes())["scenarios"]["batch"]["result"]["runs"]
