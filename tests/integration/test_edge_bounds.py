"""The edge's small bounds that held only in part (issue 27, point 5), against real processes: a
request head in one read, HTTP/1.0 framing, a promised body that never comes after its answer,
`/readyz` naming no address, `tokenfan keys` without Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests import hostile
from tests.integration.test_ops_cli import clean_env
from tests.ports import free_port
from tests.procs import Cluster, create_stream, read_stream
from tokenfan.ops.embedded import EmbeddedRedis
from tokenfan.shared import apikeys
from tokenfan.shared.defaults import MAX_HEADER_BYTES

DEADLINE_S = 30.0


def test_a_head_over_the_bound_in_one_read_is_refused(cluster: Cluster) -> None:
    api = cluster.api()
    for size in (MAX_HEADER_BYTES + 1024, 2 * MAX_HEADER_BYTES - 4096):  # both fit one 256 KB read
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        got = hostile.one_write(api.port, head, DEADLINE_S)
        assert got.status == 431 and got.closed and b'"code":"headers_too_large"' in got.answer, got
    fits = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fits: " + b"a" * (MAX_HEADER_BYTES - 1024) + b"\r\n\r\n"
    assert hostile.one_write(api.port, fits + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                             DEADLINE_S).answer.count(b"HTTP/1.1 200 OK") == 2


def test_http10_gets_one_connection_header_and_no_chunks(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    sid = create_stream(api.url, "old client", max_tokens=4)
    read_stream(api.url, sid)  # ended: the HTTP/1.0 read below replays it whole
    got = hostile.one_write(api.port, f"GET /v1/streams/{sid} HTTP/1.0\r\n\r\n".encode(), DEADLINE_S)
    head, _, body = got.answer.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.split(b"\r\n")[1:]]
    assert got.status == 200 and got.closed, got
    assert [line for line in lines if line.startswith(b"connection:")] == [b"connection: close"], lines
    assert not any(line.startswith((b"transfer-encoding:", b"content-length:")) for line in lines), lines
    assert body.startswith(b"id: 1\n") or body.startswith(b":"), body[:80]  # the events as they are, no chunk sizes
    assert b"event: done" in body


def test_a_body_promised_and_never_sent_gets_one_answer_then_the_close(cluster: Cluster) -> None:
    api = cluster.api(TOKENFAN_BODY_TIMEOUT_S="1")
    got = hostile.one_write(api.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", DEADLINE_S)
    assert got.status == 200 and got.closed, got
    assert got.answer.count(b"HTTP/1.1 ") == 1, got.answer  # no 408 after the 200


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
