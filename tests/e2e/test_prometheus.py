"""The shipped Prometheus config, for real: Debian's Prometheus on the rendered ops/prometheus template,
finding two API processes and two workers (fake engine) through the API's service discovery, under load;
then every PromQL expression of the Grafana dashboards and every rule, evaluated through Prometheus's HTTP
API, must parse and return data. A query that returns nothing for a live system is a broken panel.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.deploy import PROMETHEUS_RULES, Prometheus
from tests.ports import free_port
from tests.procs import Cluster, Proc, create_stream, read_stream, wait_for
from tokenfan.shared.apikeys import make_record

DASHBOARDS = Path(__file__).resolve().parents[2] / "ops/grafana/dashboards"
# Grafana's variables, as a query over the last minutes sees them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", '"$model"': '".*"'}
COMPARISON = re.compile(r"\s(>|<|>=|<=|==|!=)\s+(-?[\d.e]+)\s*$")


@dataclass
class Monitored:
    apis: list[Proc]
    workers: list[Proc]
    prometheus: Prometheus
    cluster: Cluster

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> dict[str, str]:
        """Active scrape targets: address -> health."""
        body = httpx.get(f"{self.prometheus.url}/api/v1/targets", timeout=10).json()
        return {t["labels"]["instance"]: t["health"] for t in body["data"]["activeTargets"]}


class Load(threading.Thread):
    """Streams through both APIs, read to their end, until told to stop."""

    def __init__(self, apis: list[Proc]) -> None:
        super().__init__(daemon=True, name="load")
        self.apis = apis
        self.stop = threading.Event()
        self.done = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                base = self.apis[self.done % len(self.apis)].url
                sid = create_stream(base, f"load {self.done}", max_tokens=12)
                status, _ = read_stream(base, sid, timeout=30)
                assert status == 200
                if self.done % 3 == 0:  # a resume now and then, for the resume panel
                    read_stream(base, sid, last=3, timeout=30)
                self.done += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def worker_env() -> dict[str, str]:
    return {"TOKENFAN_METRICS_PORT": str(free_port()), "TOKENFAN_FAKE_RATE": "100"}


@pytest.fixture
def monitored(cluster: Cluster) -> Iterator[Monitored]:
    apis = [cluster.api(), cluster.api()]
    workers = [cluster.worker(**worker_env()), cluster.worker(**worker_env())]
    env = {"PROMETHEUS_SD_URL": f"{apis[0].url}/metrics/targets"}
    with Prometheus(env, cluster.test_name) as prometheus:
        yield Monitored(apis, workers, prometheus, cluster)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel query in every dashboard."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        def walk(panels: list[dict[str, Any]], name: str = path.name) -> None:
            for p in panels:
                found.extend((f"{name}: {p.get('title')}", t["expr"]) for t in p.get("targets", []) if "expr" in t)
                walk(p.get("panels", []))
        walk(json.loads(path.read_text())["panels"])
    return found


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"] for r in g["rules"]]


def as_bool(expr: str) -> str:
    """`quantity > N` as `quantity > bool N`: data whenever the quantity has data, firing or not."""
    assert COMPARISON.search(expr), f"an alert that is not `quantity <op> number`: {expr}"
    return COMPARISON.sub(r" \1 bool \2", expr)


def test_dashboards_and_rules_return_data_from_a_live_system(monitored: Monitored) -> None:
    addresses = {a.url.removeprefix("http://") for a in monitored.apis}
    wait_for(lambda: sum(h == "up" for h in monitored.targets().values()) == 4, timeout=60,
             what=f"2 APIs and 2 workers scraped\n{monitored.prometheus.log()}")
    assert addresses <= set(monitored.targets()), "the API processes are found"
    load = Load(monitored.apis)
    load.start()
    try:
        exprs = [(w, grafana(e)) for w, e in dashboard_exprs()]
        exprs += [(f"rule {r['record']}", r["expr"]) for r in rules() if "record" in r]
        exprs += [(f"alert {r['alert']}", as_bool(r["expr"])) for r in rules() if "alert" in r]
        assert len(exprs) > 30
        empty: list[str] = []

        def all_answer() -> bool:
            assert load.error is None, load.error
            empty[:] = [f"{w}: {e}" for w, e in exprs if not monitored.query(e)]
            return not empty

        wait_for(all_answer, timeout=120, interval=2, what=f"data for every query; still empty: {empty}")
    finally:
        load.stop.set()
        load.join(60)
    assert load.error is None, load.error
    assert load.done >= 3
    # The dashboard's model variable (label_values) finds the served model.
    values = httpx.get(f"{monitored.prometheus.url}/api/v1/label/model/values",
                       params={"match[]": "tokenfan_worker_busy"}, timeout=10).json()["data"]
    assert values == ["smollm2"]
    # Prometheus loaded and evaluated every rule without an error.
    loaded = httpx.get(f"{monitored.prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = [r for g in loaded for r in g["rules"]]
    assert len(evaluated) == len(rules())
    def healthy() -> bool:
        groups = httpx.get(f"{monitored.prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return all(r["health"] == "ok" for g in groups for r in g["rules"])

    wait_for(healthy, timeout=60, what="every rule evaluated")
    assert all(r.get("lastError", "") == "" for r in evaluated), evaluated


def test_workers_are_found_not_listed(monitored: Monitored) -> None:
    """A new worker becomes a target with no edit of prometheus.yml; a stopped one leaves the list."""
    env = worker_env()
    extra = monitored.cluster.worker(**env)
    address = f"{socket.gethostname()}:{env['TOKENFAN_METRICS_PORT']}"
    groups = httpx.get(f"{monitored.apis[1].url}/metrics/targets", params={"role": "worker"}, timeout=10).json()
    assert address in [t for g in groups for t in g["targets"]]
    assert all(g["labels"]["__meta_tokenfan_role"] == "worker" for g in groups)
    wait_for(lambda: monitored.targets().get(address) == "up", timeout=60,
             what=f"Prometheus scraping the new worker {address}")
    got = monitored.query(f'tokenfan_worker_busy{{instance="{address}"}}')
    assert got and got[0]["metric"]["process"] == extra.name
    extra.stop()
    wait_for(lambda: address not in [t for g in httpx.get(f"{monitored.apis[0].url}/metrics/targets",
                                                           timeout=10).json() for t in g["targets"]],
             timeout=30, what="the stopped worker leaving the targets")


def test_targets_are_restricted_like_metrics(cluster: Cluster) -> None:
    key, rec = make_record("ops", admin=True, max_concurrent=4, rpm=60)
    keys = orjson.dumps({"keys": [rec.model_dump()]}).decode()
    closed = cluster.api(TOKENFAN_API_KEYS=keys)
    allowed = cluster.api(TOKENFAN_API_KEYS=keys, TOKENFAN_METRICS_ALLOW="127.0.0.0/8")
    for path in ("/metrics", "/metrics/targets"):
        assert httpx.get(f"{closed.url}{path}", timeout=10).status_code == 401, path
        assert httpx.get(f"{closed.url}{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=10).status_code == 200, path
        assert httpx.get(f"{allowed.url}{path}", timeout=10).status_code == 200, path
    bad = httpx.get(f"{allowed.url}/metrics/targets", params={"role": "db"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"
    groups = httpx.get(f"{allowed.url}/metrics/targets", params={"role": "api"}, timeout=10).json()
    assert sorted(t for g in groups for t in g["targets"]) == sorted(
        f"127.0.0.1:{p.port}" for p in (closed, allowed))
