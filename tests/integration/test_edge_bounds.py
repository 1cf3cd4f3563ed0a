"""The edge's small bounds that held only in part (issue 27, point 5), against real processes: a
request head in one read, HTTP/1.0 framing, a promised body that never comes after its answer,
`/readyz` naming no address, `tokenfan keys` without Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.test_ops_cli import clean_env
from tests.procs import Cluster
from tokenfan.ops.embedded import EmbeddedRedis, free_port
from tokenfan.shared import apikeys

DEADLINE_S = 30.0


def test_readyz_says_redis_unreachable_without_the_address(own_redis: EmbeddedRedis, cluster: Cluster,
                                                           tmp_path: Path) -> None:
    admin, rec = apikeys.make_record("ops", admin=True, max_concurrent=1, rpm=60)
    keyfile = tmp_path / "keys.json"
    apikeys.save_file(keyfile, {rec.hash: rec})
    cluster.redis_url = own_redis.url
    api = cluster.api(TOKENFAN_API_KEYS_FILE=str(keyfile))
    own_redis.stop()
    anyone = httpx.get(f"{api.url}/readyz", timeout=DEADLINE_S)
    assert anyone.status_code == 503 and anyone.json() == {"status": "unready", "reason": "Redis unreachable"}
    assert str(own_redis.port) not in anyone.text
    admins = httpx.get(f"{api.url}/readyz", headers={"Authorization": f"Bearer {admin}"}, timeout=DEADLINE_S)
    assert admins.status_code == 503 and str(own_redis.port) in admins.json()["detail"], admins.text


def test_keys_list_without_redis_is_one_line() -> None:
    env = {**clean_env(), "TOKENFAN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    out = subprocess.run([sys.executable, "-m", "tokenfan.ops", "keys", "list"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("tokenfan: cannot reach Redis at redis://127.0.0.1:"), out.stderr
