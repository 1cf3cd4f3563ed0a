"""Every process works against a Redis with an ACL user, a password and TLS, and logs no password."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.ports import free_port
from tests.procs import Cluster, create_stream, logged, read_stream, wait_for
from tokenfan.ops.embedded import find_redis_server

PASSWORD = "s3cret-Pa55word-never-logged"


def _certs(folder: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tokenfan-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "redis.key", "-out", "redis.csr")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "redis.crt")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    _certs(tmp_path)
    port = free_port()
    proc = subprocess.Popen([
        find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(tmp_path / "redis.crt"), "--tls-key-file", str(tmp_path / "redis.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        "--user", "default", "off", "--user", "tokenfan", "on", f">{PASSWORD}", "~*", "&*", "+@all",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://tokenfan:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}"
    try:
        wait_for(lambda: redis.Redis.from_url(url).ping(), timeout=15, what="Redis with TLS")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_acl_user_password_and_tls_work_and_no_password_is_logged(tls_redis: str, cluster: Cluster) -> None:
    # tls_redis first: it is set up before the cluster and stopped after its processes
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(tls_redis.replace(PASSWORD, "wrong")).ping()
    cluster.redis_url = tls_redis
    api = cluster.api()
    worker = cluster.worker()
    sid = create_stream(api.url, "over tls", max_tokens=6)
    evs = logged(read_stream(api.url, sid)[1])
    assert evs[-1].event == "done" and len([e for e in evs if e.event == "token"]) == 6
    api.stop()
    worker.stop()
    for proc in (api, worker):
        text = proc.log()
        assert "redis" in text.lower()  # it did log where it connects
        assert PASSWORD not in text
