"""`tokenfan bench --quick`: every scenario end to end at tiny sizes, so the benchmark does not rot.

Figures are checked for sanity only (something was measured, percentiles
are ordered, nothing failed, the files were written), never against the
targets: a smoke run on a busy machine says nothing about performance.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from tokenfan.bench import main as bench
from tokenfan.bench import pubsub, versus
from tokenfan.bench.procs import BenchError

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, scenario: str, *more: str) -> dict[str, Any]:
    out, js, chart = tmp_path / "benchmarks.md", tmp_path / "results.json", tmp_path / "latency.png"
    code = bench.main([scenario, "--quick", "--out", str(out), "--json", str(js), "--chart", str(chart), *more])
    assert code == 0
    doc = orjson.loads(js.read_bytes())
    entry = doc["scenarios"][scenario]
    assert entry["quick"] is True
    assert entry["command"].startswith(f"tokenfan bench {scenario} --quick")
    text = out.read_text()
    assert "tokenfan bench" in text and "### Targets" in text
    return dict(entry["result"])


def _ordered(s: dict[str, Any]) -> None:
    assert s["count"] > 0
    assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


def test_relay_overhead_smoke(tmp_path: Path) -> None:
    result = _run(tmp_path, "relay")
    assert len(result["levels"]) >= 2
    for level in result["levels"]:
        assert level["failed"] == 0
        assert level["tokens_received"] == level["tokens_published"] > 0
        _ordered(level["lag_ms"])
        _ordered(level["floor"]["lag_ms"])
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_capacity_smoke(tmp_path: Path) -> None:
    result = _run(tmp_path, "capacity")
    assert result["throughput"]
    for step in result["throughput"]:
        assert step["failed"] == 0
        assert step["delivered_in_window_per_s"] > 0
        _ordered(step["lag_ms"])
    for row in result["idle"]:
        assert row["held"], row
        assert row["rss_after"] > 0 and row["connected"] == row["streams"]
    assert len(result["targets"]) == 3


def test_ttft_overhead_smoke(tmp_path: Path) -> None:
    result = _run(tmp_path, "ttft")
    for route in ("openai", "native"):
        s = result["routes"][route]
        assert s["failed"] == 0
        assert s["total_ms"]["count"] == result["requests"]
        assert s["total_ms"]["p50"] > 0 and s["overhead_ms"]["p50"] <= s["overhead_ms"]["p95"]


@pytest.mark.model
def test_end_to_end_with_the_model_smoke(tmp_path: Path) -> None:
    result = _run(tmp_path, "e2e")
    for run in result["runs"]:
        for side in ("direct", "tokenfan"):
            assert run[side]["failed"] == 0
            assert run[side]["decode_tokens_per_s"] > 0
        assert run["same_text"] is True  # temperature 0: both sides write the same answer
        assert run["ratio_pct"] > 0


@pytest.mark.model
def test_against_llama_cpp_server_smoke(tmp_path: Path) -> None:
    if importlib.util.find_spec("starlette_context") is None:
        pytest.skip("llama_cpp.server needs the `llama-cpp-python[server]` extras (`pip install -e '.[bench]'`)")
    result = _run(tmp_path, "server")
    sides = {row["side"] for row in result["rows"]}
    assert sides == {"tokenfan", "llama_cpp.server"}
    for row in result["rows"]:
        assert row["failed"] == 0 and row["tokens"] > 0
        if row["side"] == "tokenfan":  # tokenfan queues, it never cuts a stream short
            assert row["completed"] == row["requests"]


def test_versus_another_checkout_smoke(tmp_path: Path) -> None:
    # The other commit is a copy of this one's tiers: its API must run from the copy, not the install.
    other = tmp_path / "other"
    for tier in ("shared", "api", "worker", "ops"):
        shutil.copytree(ROOT / tier, other / tier, ignore=shutil.ignore_patterns("__pycache__"))
    result = _run(tmp_path, "versus", "--against", str(other))
    assert result["against"] == str(other.resolve()) and result["pairs"] == 1
    for side in ("baseline", "this"):
        (run,) = result["runs"][side]
        assert run["relay_p50_ms"] > 0 and run["flat_out_per_s"] > 0 and run["idle_kb_per_stream"] is not None
    assert [f["key"] for f in result["figures"]] == [k for k, *_ in versus.FIGURES]
    assert len(result["targets"]) == len(versus.FIGURES)


def test_hub_against_redis_py_smoke(tmp_path: Path) -> None:
    result = _run(tmp_path, "hub")
    (level,) = result["levels"]
    for side in ("hub", "redis-py"):
        (run,) = level["runs"][side]
        assert run["lost"] == 0, run
        assert run["flat_out_per_s"] > 0 and run["flat_out_cpu_ms_per_1000"] > 0 and run["rate_cpu_ms_per_1000"] > 0
        assert 0 < run["rate_p50_ms"] <= run["rate_p99_ms"]
        _ordered(run["rate_lag_ms"])
    assert "Hiredis" in level["runs"]["redis-py"][0]["parser"]  # redis-py parses with hiredis too
    assert all(level["ratio_redis_py_over_hub"][key] > 0 for key, *_ in pubsub.FIGURES)
    assert len(result["targets"]) == 2
    assert "10. The API's pub/sub client against redis-py's own" in (tmp_path / "benchmarks.md").read_text()


def test_versus_refuses_a_folder_that_is_no_checkout(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="is it a checkout"):
        versus.check_checkout(tmp_path, tmp_path / "scratch")




@pytest.mark.model
def test_repack_on_and_off_smoke(tmp_path: Path) -> None:
    result = _run(tmp_path, "repack")
    assert [row["model"].rsplit(".", 2)[-2] for row in result["models"]] == ["Q4_1", "requant-Q4_0"]
    for row in result["models"]:
        assert len(row["on"]) == len(row["off"]) == 1
        for side in row["on"] + row["off"]:
            assert "crashed" in side or (side["decode_tps"] > 0 and side["prefill_tps"] > 0), side
        off = row["off"][0]
        if "crashed" not in off:  # extra buffer types off: every weight in the plain CPU buffer
            assert set(off["buffers"]) <= {"CPU_Mapped", "CPU"}, off["buffers"]
    assert "9. CPU weight repacking" in (tmp_path / "benchmarks.md").read_text()
