"""A partitioned worker, and nothing that assumes one machine.

Redis, two API processes and two workers each run on a host of their own
(a network namespace on a test switch: tests/netns.py); the test reaches
them from this namespace as a client on the network would. One worker's
cable is pulled mid-stream: its streams go on on the other worker, the text
exact, within the lease bound (lease TTL plus the failover wait). When the
cable is back, the cut-off worker finds its leases taken and writes nothing
more into those streams (the publish script's fence: every seq is in the log
once), and it serves new work again.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests import netns
from tests.procs import SSE, Cluster, Proc, create_stream, expected_text, log_name, logged, sse_events, wait_for
from tokenfan.shared import keys, registry
from tokenfan.shared.events import Event, Token, decode
from tokenfan.shared.state import StreamState

HOSTS = ["redis", "api1", "api2", "w1", "w2"]
LEASE_TTL_S = 1.5
FAILOVER_WAIT_S = 15.0
# The promise: a stream whose worker is lost makes progress again within its lease plus the failover wait.
BOUND_S = LEASE_TTL_S + FAILOVER_WAIT_S
ENV = {"TOKENFAN_LEASE_TTL_S": str(LEASE_TTL_S), "TOKENFAN_KEEPER_INTERVAL_S": "0.25",
       "TOKENFAN_FAILOVER_WAIT_S": str(FAILOVER_WAIT_S), "TOKENFAN_FAKE_RATE": "10", "TOKENFAN_FAKE_TOKENS": "500",
       # No keep-alive pings within a viewer's read timeout: a stream silent past the bound fails the read.
       "TOKENFAN_HEARTBEAT_S": "120"}
STREAMS = 4
TOKENS = 80  # 8 s at 10 tokens/s: the cut, the takeover and the mend all happen mid-stream


@pytest.fixture
def net() -> Iterator[netns.Network]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"no network namespaces: {reason}")
    network = netns.Network.create(HOSTS)
    try:
        yield network
    finally:
        network.close()
        assert not network.leftovers(), network.leftovers()


@pytest.fixture
def hosts(net: netns.Network, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A cluster whose Redis, APIs and workers each run on their own host (the test starts the latter)."""
    c = Cluster("", env=dict(ENV), test_name=log_name(request))
    try:
        c.redis_url = c.redis_server(net.host("redis")).redis_url
        yield c
    finally:
        c.stop_all()


def _follow(base: str, sid: str) -> list[SSE]:
    """One viewer of a stream to its end."""
    got: list[SSE] = []
    with httpx.stream("GET", f"{base}/v1/streams/{sid}", timeout=httpx.Timeout(BOUND_S + 10)) as resp:
        assert resp.status_code == 200, resp.read()
        for ev in sse_events(resp):
            got.append(ev)
            if ev.event in ("done", "error"):
                break
    return logged(got)


def _log(r: redis.Redis, sid: str) -> list[Event]:
    """The stream's log as stored (each entry's raw event under `e`)."""
    return [decode(fields[b"e"]) for _, fields in r.xrange(keys.log(sid))]


def _worker_of(r: redis.Redis, sid: str) -> str:
    state = StreamState.load(r, sid, with_request=False)
    return state.worker if state else ""


def _tokens_in(r: redis.Redis, sid: str) -> int:
    return sum(e.type == "token" for e in _log(r, sid))


def _assert_exact(evs: list[SSE], content: str) -> None:
    seqs = [int(e.id) for e in evs]
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
    assert [e.event for e in evs].count("done") == 1 and evs[-1].event == "done", [e.event for e in evs]
    assert "".join(e.json()["text"] for e in evs if e.event == "token") == expected_text(content, TOKENS)


def _assert_log_exact(r: redis.Redis, sid: str, content: str) -> None:
    log = _log(r, sid)
    assert [e.seq for e in log] == list(range(1, len(log) + 1)), [e.seq for e in log]
    assert "".join(e.text for e in log if isinstance(e, Token)) == expected_text(content, TOKENS)
    assert [e.type for e in log].count("done") == 1 and log[-1].type == "done"


def _idle_and_live(r: redis.Redis, w: Proc) -> bool:
    """The worker heartbeats again and holds no stream: it has dealt with every stream it was cut from."""
    info = registry.WorkerInfo.parse(w.name, r.hgetall(keys.worker(w.name)))
    return w.name in registry.live_workers(r, "smollm2") and info.state is registry.WorkerState.IDLE


# How long the cable stays out after the takeover: none (a blip, its writes still in flight in TCP), and
# past the worker's Redis socket timeout and retries (its calls fail, it gives those streams up itself).
LONG_CUT_S = 30.0


@pytest.mark.soak
@pytest.mark.timeout(240)
@pytest.mark.parametrize("hold_s", [0.0, LONG_CUT_S], ids=["blip", "long"])
def test_partitioned_worker_streams_go_on_elsewhere_fenced_and_it_rejoins(
        net: netns.Network, hosts: Cluster, hold_s: float) -> None:
    api1, api2 = hosts.api(net.host("api1")), hosts.api(net.host("api2"))
    w1 = hosts.worker(host=net.host("w1"))
    w2 = hosts.worker(host=net.host("w2"))
    by_host = {w1.name: "w1", w2.name: "w2"}
    r = redis.Redis.from_url(hosts.redis_url)
    contents = [f"partition number {i}" for i in range(STREAMS)]
    sids = [create_stream((api1, api2)[i % 2].url, c, max_tokens=TOKENS) for i, c in enumerate(contents)]
    with cf.ThreadPoolExecutor(STREAMS) as pool:
        viewers = [pool.submit(_follow, (api2, api1)[i % 2].url, sid) for i, sid in enumerate(sids)]
        wait_for(lambda: all(_tokens_in(r, s) >= 3 for s in sids), timeout=60, what="every stream generating")
        victim = w1 if _worker_of(r, sids[0]) == w1.name else w2
        other = w2 if victim is w1 else w1
        cut_off = [s for s in sids if _worker_of(r, s) == victim.name]
        net.cut(by_host[victim.name])
        cut_wall = time.time()
        try:
            wait_for(lambda: all(_worker_of(r, s) == other.name for s in cut_off), timeout=BOUND_S + 15,
                     what="the cut-off streams taken over")
            if hold_s:
                held = time.monotonic() + hold_s
                wait_for(lambda: time.monotonic() >= held and all(f.done() for f in viewers), timeout=hold_s + 60,
                         interval=0.25, what="the cut held and every stream ended")
        finally:
            net.mend(by_host[victim.name])
        got = [f.result(timeout=120) for f in viewers]

    for content, (sid, evs) in zip(contents, zip(sids, got, strict=True), strict=True):
        _assert_exact(evs, content)
        if sid in cut_off:
            metas = [e.json() for e in evs if e.event == "meta"]
            assert [m["worker"] for m in metas] == [victim.name, other.name] and metas[1]["resumed"] is True
            # Progress as the stream made it (each event's publish time), not as a loaded client read it.
            ts = [e.json()["ts"] for e in evs]
            before = max(t for t in ts if t <= cut_wall)  # the last event before the cut
            stall = max(b - a for a, b in itertools.pairwise([before, *(t for t in ts if t > cut_wall)]))
            assert stall <= BOUND_S, f"stream {sid} made no progress for {stall:.1f}s"

    # The cut-off worker comes back; once it holds nothing and heartbeats, every write it still had in
    # flight for those streams has been tried: the logs are as they were, each seq once.
    logs = {sid: _log(r, sid) for sid in sids}
    wait_for(lambda: _idle_and_live(r, victim), timeout=90, interval=0.25, what=f"{victim.name} back and idle")
    assert victim.alive(), victim.log()
    for content, sid in zip(contents, sids, strict=True):
        assert _log(r, sid) == logs[sid]
        _assert_log_exact(r, sid, content)

    # It serves new work: with the other worker gone, a new stream can only be its.
    other.signal(signal.SIGTERM)
    wait_for(lambda: not other.alive(), timeout=30, what=f"{other.name} to exit")
    sid = create_stream(api2.url, "after the partition", max_tokens=5)
    evs = _follow(api1.url, sid)
    assert evs[-1].event == "done" and [e.json()["worker"] for e in evs if e.event == "meta"] == [victim.name]
    assert _worker_of(r, sid) == victim.name
    r.close()
