"""Failures users meet in production: killed workers, deploys, killed API processes, Redis restarts."""

from __future__ import annotations

import signal

import httpx
import redis

from tests.procs import (
    SSE,
    Cluster,
    create_stream,
    expected_text,
    logged,
    read_stream,
    sse_events,
    stream_status,
    token_text,
    wait_for,
)
from tokenfan.ops.embedded import EmbeddedRedis
from tokenfan.shared.state import StreamStatus

FAST_LEASE = {"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25"}



def _follow_until(base: str, sid: str, tokens: int, timeout: float = 30) -> list[SSE]:
    """Read until `tokens` tokens arrived, then close the connection (the stream goes on)."""
    got: list[SSE] = []
    with httpx.stream("GET", f"{base}/v1/streams/{sid}", timeout=timeout) as resp:
        for ev in sse_events(resp):
            got.append(ev)
            if len([e for e in got if e.event == "token"]) >= tokens or ev.event in ("done", "error"):
                break
    return logged(got)


def _one_terminal(evs: list[SSE]) -> None:
    seqs = [int(e.id) for e in evs]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert sum(e.event in ("done", "error") for e in evs) == 1 and evs[-1].event in ("done", "error")


def test_sigkill_worker_stream_continues_on_another(cluster: Cluster) -> None:
    cluster.env.update(FAST_LEASE)
    api = cluster.api()
    first = cluster.worker(TOKENFAN_FAKE_RATE="20")
    sid = create_stream(api.url, "survive the crash", max_tokens=30)
    wait_for(lambda: len(_follow_until(api.url, sid, 5)) >= 7, what="five tokens")
    first.signal(signal.SIGKILL)
    second = cluster.worker(TOKENFAN_FAKE_RATE="50")
    _, got = read_stream(api.url, sid, timeout=30)
    evs = logged(got)
    _one_terminal(evs)
    # No wall-clock bound here: read_stream fails on any 30 s of silence, which is the promise.
    assert evs[-1].event == "done", evs[-1].data
    metas = [e.json() for e in evs if e.event == "meta"]
    assert len(metas) == 2 and metas[1]["resumed"] is True and metas[1]["worker"] == second.name
    assert token_text(evs) == expected_text("survive the crash", 30)  # one continuous answer
    assert evs[-1].json()["usage"]["completion_tokens"] == 30


def test_sigkill_only_worker_ends_stream_once_no_worker_comes_within_the_failover_wait(cluster: Cluster) -> None:
    cluster.env.update({**FAST_LEASE, "TOKENFAN_FAILOVER_WAIT_S": "2"})
    api = cluster.api()
    only = cluster.worker(TOKENFAN_FAKE_RATE="20")
    sid = create_stream(api.url, "nobody left", max_tokens=100)
    _follow_until(api.url, sid, 3)
    only.signal(signal.SIGKILL)
    _, got = read_stream(api.url, sid, timeout=30)
    evs = logged(got)
    _one_terminal(evs)
    err = evs[-1].json()
    assert evs[-1].event == "error" and err["code"] == "worker_lost" and err["retryable"] is True
    assert err["message"] == "no worker took the stream over within 2s", err


def test_sigkill_only_worker_stream_goes_on_on_the_worker_started_after(cluster: Cluster) -> None:
    # what a supervisor does: the only worker dies, a new one starts seconds later and takes the stream
    cluster.env.update(FAST_LEASE)
    api = cluster.api()
    only = cluster.worker(TOKENFAN_FAKE_RATE="20")
    sid = create_stream(api.url, "a restart", max_tokens=40)
    _follow_until(api.url, sid, 3)
    only.signal(signal.SIGKILL)
    only.popen.wait(10)
    restarted = cluster.worker(TOKENFAN_FAKE_RATE="50")
    evs = logged(read_stream(api.url, sid, timeout=30)[1])
    _one_terminal(evs)
    assert evs[-1].event == "done", evs[-1].data
    metas = [e.json() for e in evs if e.event == "meta"]
    assert len(metas) == 2 and metas[1]["resumed"] is True and metas[1]["worker"] == restarted.name, metas
    assert token_text(evs) == expected_text("a restart", 40)


def test_failover_error_mode_ends_with_error_even_with_a_spare_worker(cluster: Cluster) -> None:
    cluster.env.update({**FAST_LEASE, "TOKENFAN_FAILOVER": "error"})
    api = cluster.api()
    doomed = cluster.worker(TOKENFAN_FAKE_RATE="20")
    sid = create_stream(api.url, max_tokens=100)
    _follow_until(api.url, sid, 3)
    cluster.worker()
    doomed.signal(signal.SIGKILL)
    evs = logged(read_stream(api.url, sid, timeout=30)[1])
    assert evs[-1].event == "error" and evs[-1].json()["code"] == "worker_lost"


def test_sigterm_worker_finishes_its_stream_then_exits(cluster: Cluster) -> None:
    api = cluster.api()
    w = cluster.worker(TOKENFAN_FAKE_RATE="40")
    sid = create_stream(api.url, "deploy", max_tokens=40)
    _follow_until(api.url, sid, 3)
    w.signal(signal.SIGTERM)
    queued = create_stream(api.url, "after deploy", max_tokens=3)
    evs = logged(read_stream(api.url, sid, timeout=30)[1])
    _one_terminal(evs)
    assert evs[-1].event == "done" and token_text(evs) == expected_text("deploy", 40)
    wait_for(lambda: not w.alive(), timeout=15, what="the worker to exit")
    r = redis.Redis.from_url(cluster.redis_url)
    assert stream_status(r, queued) is StreamStatus.QUEUED  # it took no new job
    cluster.worker()
    assert logged(read_stream(api.url, queued)[1])[-1].event == "done"
    r.close()


def test_sigterm_worker_hands_long_stream_back_after_grace(cluster: Cluster) -> None:
    cluster.env.update(FAST_LEASE)
    api = cluster.api()
    w = cluster.worker(TOKENFAN_FAKE_RATE="10", TOKENFAN_SHUTDOWN_GRACE_S="1")
    sid = create_stream(api.url, "hand me back", max_tokens=60)
    _follow_until(api.url, sid, 3)
    w.signal(signal.SIGTERM)
    wait_for(lambda: not w.alive(), timeout=15, what="the worker to hand back and exit")
    second = cluster.worker(TOKENFAN_FAKE_RATE="100")
    evs = logged(read_stream(api.url, sid, timeout=30)[1])
    _one_terminal(evs)
    assert evs[-1].event == "done"
    metas = [e.json() for e in evs if e.event == "meta"]
    assert metas[-1]["resumed"] is True and metas[-1]["worker"] == second.name
    assert token_text(evs) == expected_text("hand me back", 60)


def test_sigterm_worker_while_redis_is_down_exits_within_its_grace_and_says_what_it_left(
        own_redis: EmbeddedRedis) -> None:
    """Redis gone and the worker told to stop: its deregistrations are tried once, not retried
    through the outage (about 5 s a command, 21 s and a traceback in all before): exit 0 within
    the grace, one line for each record left to expire."""
    c = Cluster(own_redis.url, test_name="sigterm_with_redis_down")
    try:
        w = c.worker(TOKENFAN_SHUTDOWN_GRACE_S="15")
        own_redis.stop()
        w.signal(signal.SIGTERM)
        w.popen.wait(15)  # TimeoutExpired: still running when its grace is out
        log = w.log()
        assert w.popen.returncode == 0 and "Traceback" not in log, log
        assert "could not deregister from RQ" in log and "could not deregister (" in log, log
        assert f"Worker {w.name}: stopped" in log
    finally:
        c.stop_all()


def test_killed_api_client_resumes_on_another(cluster: Cluster) -> None:
    a, b = cluster.api(), cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="30")
    sid = create_stream(a.url, "api crash", max_tokens=40)
    got: list[SSE] = []
    try:
        with httpx.stream("GET", f"{a.url}/v1/streams/{sid}", timeout=10) as resp:
            for ev in sse_events(resp):
                got.append(ev)
                if len(got) == 6:
                    a.signal(signal.SIGKILL)
    except httpx.HTTPError:
        pass  # the connection dies with the process
    got = logged(got)
    rest = logged(read_stream(b.url, sid, last=int(got[-1].id))[1])
    evs = got + rest
    _one_terminal(evs)
    assert token_text(evs) == expected_text("api crash", 40)


def test_redis_restart_mid_stream_ends_with_error_and_new_requests_work(cluster: Cluster) -> None:
    own = EmbeddedRedis().start()
    try:
        cluster.redis_url = own.url
        api = cluster.api()
        cluster.worker(TOKENFAN_FAKE_RATE="20")
        sid = create_stream(api.url, max_tokens=200)
        got: list[SSE] = []
        with httpx.stream("GET", f"{api.url}/v1/streams/{sid}", timeout=30) as resp:
            for ev in sse_events(resp):
                got.append(ev)
                if len(got) == 5:
                    own.stop()
                    own = EmbeddedRedis(port=own.port, binary=own.binary).start()
                if ev.event in ("done", "error"):
                    break
        assert got[-1].event == "error", [e.event for e in got]
        assert got[-1].json()["retryable"] is True

        def works() -> bool:
            s = create_stream(api.url, "after restart", max_tokens=3)
            return logged(read_stream(api.url, s, timeout=10)[1])[-1].event == "done"

        assert wait_for(works, timeout=30, interval=0.5, what="a new request after the restart")
    finally:
        cluster.stop_all()  # before their Redis
        own.stop()


def test_sigterm_api_tells_native_clients_to_reconnect(cluster: Cluster) -> None:
    a = cluster.api(TOKENFAN_SHUTDOWN_GRACE_S="4")
    b = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="10")
    sid = create_stream(a.url, "drain me", max_tokens=60)
    got: list[SSE] = []
    with httpx.stream("GET", f"{a.url}/v1/streams/{sid}", timeout=30) as resp:
        for ev in sse_events(resp):
            got.append(ev)
            if len(got) == 4:
                a.signal(signal.SIGTERM)
    assert got[-1].event == "reconnect" and got[-1].json()["reason"] == "server_shutdown"
    # Told at once, not at the end of the 4 s grace: at 10 tokens/s a late notice would follow ~40
    # more tokens. A loaded machine only makes fewer tokens, so this cannot fail for load.
    assert len([e for e in got[4:] if e.event == "token"]) < 20, [e.event for e in got]
    part = logged([e for e in got if e.event != "reconnect"])
    rest = logged(read_stream(b.url, sid, last=int(got[-1].id))[1])
    evs = part + rest
    _one_terminal(evs)
    assert token_text(evs) == expected_text("drain me", 60)
    wait_for(lambda: not a.alive(), timeout=15, what="the API to exit")
