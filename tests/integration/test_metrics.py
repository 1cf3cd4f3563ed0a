"""What an operator watches: Prometheus metrics of the API and the workers,
`/readyz`, and the ops data endpoints, across real processes on a real Redis."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port
from tests.procs import SSE, Cluster, Proc, create_stream, expected_text, logged, read_stream, sse_events, wait_for

MODEL = "smollm2"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- helpers ---------------------------------------------------------------

def scrape(base: str) -> Samples:
    """Every sample of a /metrics page, keyed by (sample name, sorted labels)."""
    resp = httpx.get(f"{base}/metrics", timeout=5)
    assert resp.status_code == 200, resp.text
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    """A sample that must be there."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"metric {name}{labels} missing; have {sorted({k[0] for k in samples})}"
    return samples[key]


def cnt(samples: Samples, name: str, **labels: str) -> float:
    """A counter sample, 0 before its label set was first used."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return cnt(after, name, **labels) - cnt(before, name, **labels)


def scrape_until(base: str, pred: Callable[[Samples], bool], what: str, timeout: float = 10) -> Samples:
    """Scrape until `pred` holds for the samples; those samples."""
    def check() -> Samples | None:
        s = scrape(base)
        return s if pred(s) else None

    result: Samples = wait_for(check, timeout=timeout, what=what)
    return result


def worker_with_metrics(cluster: Cluster, **env: str) -> tuple[Proc, str]:
    port = free_port()
    w = cluster.worker(TOKENFAN_METRICS_PORT=str(port), **env)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: scrape(url), timeout=10, what=f"worker metrics on {url}")
    return w, url


def tokens_of(evs: list[SSE]) -> str:
    return "".join(e.json()["text"] for e in evs if e.event == "token")


def snapshot(base: str) -> dict[str, Any]:
    resp = httpx.get(f"{base}/v1/ops/snapshot", timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    data: dict[str, Any] = resp.json()
    return data


def stream_in(snap: dict[str, Any], sid: str) -> dict[str, Any] | None:
    return next((s for s in snap["streams"] if s["id"] == sid), None)


def readyz(base: str) -> tuple[int, dict[str, Any]]:
    resp = httpx.get(f"{base}/readyz", timeout=5)
    return resp.status_code, resp.json()


SNAPSHOT_KEYS = {"time", "models", "workers", "streams", "errors", "totals"}


# --- metrics ---------------------------------------------------------------

def test_metrics_move_for_a_native_and_an_openai_stream(cluster: Cluster) -> None:
    n = 10
    api = cluster.api()
    _, wurl = worker_with_metrics(cluster)
    a0, w0 = scrape(api.url), scrape(wurl)
    assert get(w0, "tokenfan_worker_busy", model=MODEL) == 0
    assert get(w0, "tokenfan_worker_model_load_seconds", model=MODEL) >= 0
    assert get(a0, "tokenfan_api_active_streams") == 0

    content = "count the metrics"
    sid = create_stream(api.url, content, max_tokens=n)
    status, got = read_stream(api.url, sid)
    assert status == 200
    native = logged(got)
    assert native[-1].event == "done" and tokens_of(native) == expected_text(content, n)

    body = {"messages": [{"role": "user", "content": content}], "max_tokens": n, "stream": True}
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        frames = list(sse_events(resp))
    assert frames[-1].data == "[DONE]"
    chunks = [orjson.loads(f.data) for f in frames[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected_text(content, n)

    def settled() -> tuple[Samples, Samples] | None:
        a, w = scrape(api.url), scrape(wurl)
        done = (get(a, "tokenfan_api_active_streams") == 0
                and delta(a0, a, "tokenfan_api_requests_total", route="/v1/chat/completions", status="200") >= 1
                and delta(a0, a, "tokenfan_api_requests_total", route="/v1/streams/{stream_id}", status="200") >= 1
                and delta(w0, w, "tokenfan_worker_jobs_total", model=MODEL, outcome="done") >= 2)
        return (a, w) if done else None

    a1, w1 = wait_for(settled, timeout=10, what="both responses counted and both jobs ended")

    # API side
    assert delta(a0, a1, "tokenfan_api_requests_total", route="/v1/streams", status="201") == 1
    assert delta(a0, a1, "tokenfan_api_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta(a0, a1, "tokenfan_api_requests_total", route="/v1/streams/{stream_id}", status="200") == 1
    relayed = delta(a0, a1, "tokenfan_api_events_relayed_total")
    assert relayed >= len(native) + len(chunks), (relayed, len(native), len(chunks))
    assert relayed == 2 * (n + 3)  # meta, disclosure, n tokens, done: per stream
    # every relayed event had its lag measured
    # one observation per write (a write carries one event or a coalesced batch)
    assert 1 <= delta(a0, a1, "tokenfan_api_relay_lag_seconds_count") <= relayed
    assert delta(a0, a1, "tokenfan_api_relay_lag_seconds_sum") >= 0
    # both responses started at the beginning: each wrote a first token
    assert delta(a0, a1, "tokenfan_api_first_token_seconds_count") == 2
    assert get(a1, "tokenfan_api_active_streams") == 0
    assert delta(a0, a1, "tokenfan_api_resumes_total") == 0
    assert delta(a0, a1, "tokenfan_api_disconnects_total") == 0

    # worker side
    assert delta(w0, w1, "tokenfan_worker_tokens_generated_total", model=MODEL) == 2 * n
    assert delta(w0, w1, "tokenfan_worker_jobs_total", model=MODEL, outcome="done") == 2
    assert delta(w0, w1, "tokenfan_worker_jobs_total", model=MODEL, outcome="error") == 0
    assert delta(w0, w1, "tokenfan_worker_queue_wait_seconds_count", model=MODEL) == 2
    assert delta(w0, w1, "tokenfan_worker_tokens_per_second_count", model=MODEL) == 2
    assert delta(w0, w1, "tokenfan_worker_ttft_seconds_count", model=MODEL) == 2
    assert get(w1, "tokenfan_worker_busy", model=MODEL) == 0

    # reading a finished stream again from the start is not a resume ...
    status, again = read_stream(api.url, sid)
    assert status == 200 and logged(again)[-1].event == "done"
    a2 = scrape_until(api.url, lambda s: get(s, "tokenfan_api_active_streams") == 0, "re-read response closed")
    assert delta(a1, a2, "tokenfan_api_resumes_total") == 0
    # ... a read with Last-Event-ID is
    status, tail = read_stream(api.url, sid, last=2)
    assert status == 200
    assert [int(e.id) for e in logged(tail)] == list(range(3, n + 4))
    a3 = scrape_until(api.url, lambda s: get(s, "tokenfan_api_active_streams") == 0, "resumed response closed")
    assert delta(a2, a3, "tokenfan_api_resumes_total") == 1
    assert delta(a2, a3, "tokenfan_api_first_token_seconds_count") == 0  # a resume is not a first token


def test_worker_busy_while_generating_then_disconnect_and_cancel(cluster: Cluster) -> None:
    api = cluster.api()
    _, wurl = worker_with_metrics(cluster, TOKENFAN_FAKE_RATE="10")
    a0, w0 = scrape(api.url), scrape(wurl)
    assert get(w0, "tokenfan_worker_busy", model=MODEL) == 0

    sid = create_stream(api.url, "a slow answer", max_tokens=60)  # six seconds at 10 tokens/s
    with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
        assert resp.status_code == 200
        # next() by hand: leaving a for loop over the body would close the connection
        frames = sse_events(resp)
        seen = 0
        while seen < 3:
            ev = next(frames)
            seen += ev.event == "token"
            assert ev.event not in ("done", "error"), ev.data
        wait_for(lambda: get(scrape(wurl), "tokenfan_worker_busy", model=MODEL) == 1, timeout=5,
                 what="worker busy gauge at 1")
        assert get(scrape(api.url), "tokenfan_api_active_streams") == 1
    # the client left mid-stream
    wait_for(lambda: delta(a0, scrape(api.url), "tokenfan_api_disconnects_total") >= 1, timeout=10,
             what="disconnect counted")
    a1 = scrape_until(api.url, lambda s: get(s, "tokenfan_api_active_streams") == 0, "active streams back to 0")
    assert delta(a0, a1, "tokenfan_api_disconnects_total") == 1

    # the stream goes on without a viewer (no cancel_on_disconnect) until cancelled
    assert get(scrape(wurl), "tokenfan_worker_busy", model=MODEL) == 1
    resp = httpx.delete(f"{api.url}/v1/streams/{sid}", timeout=5)
    assert resp.status_code == 202 and resp.json()["status"] == "cancelling"

    def ended() -> Samples | None:
        w = scrape(wurl)
        return w if delta(w0, w, "tokenfan_worker_jobs_total", model=MODEL, outcome="cancelled") >= 1 else None

    w1 = wait_for(ended, timeout=10, what="cancelled job counted")
    assert delta(w0, w1, "tokenfan_worker_jobs_total", model=MODEL, outcome="cancelled") == 1
    assert delta(w0, w1, "tokenfan_worker_jobs_total", model=MODEL, outcome="done") == 0
    assert get(w1, "tokenfan_worker_busy", model=MODEL) == 0
    status, got = read_stream(api.url, sid)
    assert status == 200
    done = logged(got)[-1]
    assert done.event == "done" and done.json()["finish_reason"] == "cancelled"
    assert done.json()["cancel_reason"] == "client"
    # cancelled early: fewer than the 60 tokens asked for, as many as the stream carried
    generated = delta(w0, w1, "tokenfan_worker_tokens_generated_total", model=MODEL)
    assert 3 <= generated < 60
    assert generated == done.json()["usage"]["completion_tokens"]


def test_queue_depth_and_workers_live_gauges(cluster: Cluster) -> None:
    api = cluster.api()
    a = scrape(api.url)
    assert get(a, "tokenfan_queue_depth", model=MODEL) == 0
    assert get(a, "tokenfan_workers_live", model=MODEL) == 0

    create_stream(api.url, "waiting one", max_tokens=3)
    create_stream(api.url, "waiting two", max_tokens=3)
    a = scrape(api.url)
    assert get(a, "tokenfan_queue_depth", model=MODEL) == 2
    assert get(a, "tokenfan_workers_live", model=MODEL) == 0

    first = cluster.worker()
    cluster.worker()

    def drained() -> Samples | None:
        s = scrape(api.url)
        ok = get(s, "tokenfan_queue_depth", model=MODEL) == 0 and get(s, "tokenfan_workers_live", model=MODEL) == 2
        return s if ok else None

    wait_for(drained, timeout=15, what="queue drained by two live workers")
    first.stop()
    assert first.popen.returncode == 0, first.log()
    wait_for(lambda: get(scrape(api.url), "tokenfan_workers_live", model=MODEL) == 1, timeout=5,
             what="workers_live down to 1 after a clean exit")


# --- readiness -------------------------------------------------------------

def _unready_naming_model(base: str) -> dict[str, Any] | None:
    code, body = readyz(base)
    if code != 503:
        return None
    assert body["status"] == "unready"
    assert MODEL in body["reason"], body
    return body


def test_readyz_follows_the_last_worker_stopping_cleanly(cluster: Cluster) -> None:
    api = cluster.api()
    assert _unready_naming_model(api.url), "ready with no worker at all"
    w = cluster.worker()
    wait_for(lambda: readyz(api.url)[0] == 200, timeout=10, what="/readyz 200 with a worker")
    assert readyz(api.url)[1]["status"] == "ready"

    w.stop()  # SIGTERM: a clean exit deregisters at once
    assert w.popen.returncode == 0, w.log()
    # well under the 5 s heartbeat window: the deregistration, not staleness, made it unready
    wait_for(lambda: _unready_naming_model(api.url), timeout=2, what="/readyz 503 after the last worker left")

    cluster.worker(wait=False)
    wait_for(lambda: readyz(api.url)[0] == 200, timeout=30, what="/readyz 200 again with a new worker")


def test_readyz_turns_503_when_a_killed_worker_heartbeat_goes_stale(cluster: Cluster) -> None:
    api = cluster.api()
    w = cluster.worker()
    wait_for(lambda: readyz(api.url)[0] == 200, timeout=10, what="/readyz 200 with a worker")
    w.signal(signal.SIGKILL)
    t_kill = time.monotonic()
    w.popen.wait(5)
    # no deregistration: the killed worker still counts as live for a while
    assert readyz(api.url)[0] == 200
    wait_for(lambda: _unready_naming_model(api.url), timeout=10, what="/readyz 503 after SIGKILL")
    # Not before its heartbeat went stale (load can only make that later); wait_for is the deadline.
    assert time.monotonic() - t_kill >= 3.0

    cluster.worker(wait=False)
    wait_for(lambda: readyz(api.url)[0] == 200, timeout=30, what="/readyz 200 again with a new worker")


# --- the ops data endpoints ------------------------------------------------

def test_ops_snapshot_shows_running_and_queued_streams(cluster: Cluster) -> None:
    api = cluster.api()
    w = cluster.worker(TOKENFAN_FAKE_RATE="10", TOKENFAN_SLOTS="1")  # one slot: the second stream waits
    running = create_stream(api.url, "the running one", max_tokens=60)  # six seconds

    def is_running() -> dict[str, Any] | None:
        snap = snapshot(api.url)
        s = stream_in(snap, running)
        return snap if s and s["status"] == "running" and s["tokens"] > 0 else None

    snap = wait_for(is_running, timeout=10, what="running stream in the snapshot")
    assert set(snap) == SNAPSHOT_KEYS
    s = stream_in(snap, running)
    assert s is not None
    assert s["worker"] == w.name and s["model"] == MODEL and s["age_s"] >= 0

    queued = create_stream(api.url, "the queued one", max_tokens=5)
    snap = snapshot(api.url)
    q = stream_in(snap, queued)
    assert q is not None and q["status"] == "queued" and q["worker"] == "" and q["tokens"] == 0
    r = stream_in(snap, running)
    assert r is not None and r["status"] == "running"
    model = next(m for m in snap["models"] if m["name"] == MODEL)
    assert model["queue_depth"] >= 1 and model["workers_live"] == 1
    assert [x["name"] for x in snap["workers"]] == [w.name]
    worker = snap["workers"][0]
    assert worker["state"] == "busy" and worker["stream"] == running and worker["model"] == MODEL
    assert snap["totals"]["active_streams"] == 1 and snap["totals"]["queued"] == 1
    assert snap["totals"]["workers_live"] == 1

    for sid in (queued, running):
        assert httpx.delete(f"{api.url}/v1/streams/{sid}", timeout=5).status_code == 202

    def idle() -> dict[str, Any] | None:
        snap = snapshot(api.url)
        ok = not snap["streams"] and snap["workers"] and snap["workers"][0]["state"] == "idle"
        return snap if ok else None

    snap = wait_for(idle, timeout=10, what="no stream left and the worker idle")
    assert snap["workers"][0]["stream"] == ""


def test_ops_events_feed_sends_snapshots(cluster: Cluster) -> None:
    api = cluster.api()
    w = cluster.worker()
    got: list[SSE] = []
    with httpx.stream("GET", f"{api.url}/v1/ops/events", timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for ev in sse_events(resp):
            got.append(ev)
            if len(got) == 2:
                break
    assert [e.event for e in got] == ["snapshot", "snapshot"]
    first, second = got[0].json(), got[1].json()
    for data in (first, second):
        # The feed's snapshot also carries the charts' newest sample; the snapshot route does not.
        assert set(data) == SNAPSHOT_KEYS | {"sample"} and set(snapshot(api.url)) == SNAPSHOT_KEYS
        assert [x["name"] for x in data["workers"]] == [w.name]
        assert [m["name"] for m in data["models"]] == [MODEL]
    assert second["time"] > first["time"]
    assert int(got[1].id or 0) > int(got[0].id or 0)


def test_ops_snapshot_lists_a_recent_engine_error(cluster: Cluster) -> None:
    api = cluster.api()
    _, wurl = worker_with_metrics(cluster, TOKENFAN_FAKE_FAIL_AFTER="2")
    w0 = scrape(wurl)
    assert snapshot(api.url)["errors"] == []
    sid = create_stream(api.url, "this one fails", max_tokens=10)
    status, got = read_stream(api.url, sid)
    assert status == 200
    evs = logged(got)
    assert evs[-1].event == "error" and evs[-1].json()["code"] == "engine_error"
    assert [e.event for e in evs].count("token") == 2

    errors = snapshot(api.url)["errors"]
    mine = [e for e in errors if e["stream_id"] == sid]
    assert len(mine) == 1, errors
    assert mine[0]["code"] == "engine_error" and mine[0]["message"] and mine[0]["time"] > 0
    assert stream_in(snapshot(api.url), sid) is None  # ended: no longer listed as a stream

    w1 = scrape_until(wurl, lambda s: delta(w0, s, "tokenfan_worker_jobs_total", model=MODEL, outcome="error") >= 1,
                      "error job counted")
    assert delta(w0, w1, "tokenfan_worker_jobs_total", model=MODEL, outcome="error") == 1
    assert delta(w0, w1, "tokenfan_worker_jobs_total", model=MODEL, outcome="done") == 0
