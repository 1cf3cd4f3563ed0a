"""Several workers on one host (issue 16): with the metrics port left at its default, a second
worker takes the next free port and registers it, so Prometheus' service discovery and the ops page
find both; a port the operator named that is taken, or no port at all, is one line naming the
setting, exit 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import redis

from tests.procs import Cluster, Proc, wait_for
from tokenfan.shared import keys, registry


def _default_port_worker(cluster: Cluster, name: str) -> Proc:
    """A worker as a user starts it: no TOKENFAN_METRICS_PORT at all (the suite's default turns it off)."""
    env = {k: v for k, v in cluster._env({}).items() if k != "TOKENFAN_METRICS_PORT"}
    log_path = cluster.procs[0].log_path.with_name(f"{cluster.test_name}.{name}.log")
    with log_path.open("wb") as fh:
        popen = subprocess.Popen([sys.executable, "-m", "tokenfan.ops", "worker", "--worker-name", name], env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc("worker", popen, log_path, name=name)
    cluster.procs.append(proc)
    return proc


def _port(r: redis.Redis, name: str) -> int:
    return int(r.hget(keys.worker(name), "metrics_port") or 0)


def test_two_workers_on_one_host_both_start_and_both_are_scraped(cluster: Cluster, r: redis.Redis) -> None:
    api = cluster.api()
    names = [f"gpu{i}-{os.getpid()}" for i in range(2)]
    workers = [_default_port_worker(cluster, n) for n in names]
    for w in workers:
        wait_for(lambda w=w: _port(r, w.name) or not w.alive(), timeout=60, what=f"worker {w.name} registered")
        assert w.alive(), w.log()
    ports = [_port(r, n) for n in names]
    assert len(set(ports)) == 2 and all(p >= 9400 for p in ports), ports
    for port in ports:  # each is its own exporter
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "tokenfan_worker_slots" in body
    targets = httpx.get(f"{api.url}/metrics/targets", params={"role": "worker"}, timeout=5).json()
    found = {g["labels"]["__meta_tokenfan_name"]: g["targets"][0] for g in targets}
    host = socket.gethostname()
    assert {found[n] for n in names} == {f"{host}:{p}" for p in ports}
    info = registry.WorkerInfo.parse(names[1], r.hgetall(keys.worker(names[1])))
    assert info.as_json()["metrics_port"] == ports[1]  # what the ops page's worker list carries
    assert "Traceback" not in "".join(w.log() for w in workers)


def _run_worker(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFAN_") and k != "REDIS_URL"}
    full.update({"TOKENFAN_REDIS_URL": redis_url, "TOKENFAN_ENGINE": "fake", **env})
    return subprocess.run([sys.executable, "-m", "tokenfan.ops", "worker", *args], env=full, capture_output=True,
                          text=True, timeout=60)


def _one_line_naming(proc: subprocess.CompletedProcess[str], setting: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenfan:")]
    assert len(lines) == 1 and setting in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_named_port_that_is_taken_is_one_line_naming_the_setting(redis_url: str, r: redis.Redis) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for how in ({"TOKENFAN_METRICS_PORT": str(port)}, {}):
            args = () if how else ("--metrics-port", str(port))
            _one_line_naming(_run_worker(redis_url, *args, **how), "TOKENFAN_METRICS_PORT")


def test_configuration_mistakes_of_the_worker_are_one_line(redis_url: str, r: redis.Redis) -> None:
    _one_line_naming(_run_worker(redis_url, TOKENFAN_METRICS_PORT="70000"), "TOKENFAN_METRICS_PORT")
    _one_line_naming(_run_worker(redis_url, "--slots", "many"), "--slots")
    _one_line_naming(_run_worker(redis_url, TOKENFAN_REDIS_OUTAGE_S="-1"), "TOKENFAN_REDIS_OUTAGE_S")
    _one_line_naming(_run_worker("nowhere"), "TOKENFAN_REDIS_URL")
    _one_line_naming(_run_worker(redis_url, "--slots", "0"), "TOKENFAN_SLOTS")
    _one_line_naming(_run_worker(redis_url, TOKENFAN_LEASE_TTL_S="1", TOKENFAN_KEEPER_INTERVAL_S="1"),
                     "TOKENFAN_LEASE_TTL_S")
