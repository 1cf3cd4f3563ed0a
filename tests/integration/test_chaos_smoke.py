"""`tokenfan bench chaos --quick`: a short soak under faults, so the driver does not rot.

About a minute: a few clients over two API processes and three workers while
workers and API processes are SIGKILLed and SIGTERMed and started again, and
Redis is SIGKILLed and started again from its append-only file. Whatever the
machine's load, no stream may hang or fail and no token may be lost or
doubled; the speed of recovery is reported, not checked.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tokenfan.bench import main as bench

FAULTS = ["worker-kill", "worker-term", "api-kill", "api-term", "redis-restart"]
DURATION_S = 45


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_chaos_soak_smoke(tmp_path: Path) -> None:
    js = tmp_path / "results.json"
    code = bench.main(["chaos", "--quick", "--duration", str(DURATION_S), "--faults", ",".join(FAULTS),
                       "--out", str(tmp_path / "benchmarks.md"), "--json", str(js),
                       "--chart", str(tmp_path / "latency.png")])
    assert code == 0
    entry = orjson.loads(js.read_bytes())["scenarios"]["chaos"]
    assert entry["command"].startswith("tokenfan bench chaos --quick")
    r = entry["result"]
    streams, tokens = r["streams"], r["tokens"]
    assert streams["started"] > 0 and streams["completed"] > 0, streams
    assert streams["hung"] == 0, r["unfinished"]
    assert tokens["lost"] == 0 and tokens["doubled"] == 0, (tokens, r["unfinished"])
    assert streams["failed"] == 0, r["unfinished"]
    assert sum(f["count"] for f in r["faults"].values()) >= 2, r["faults"]
    assert "7. Chaos soak" in (tmp_path / "benchmarks.md").read_text()
