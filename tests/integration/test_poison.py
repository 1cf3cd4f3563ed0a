"""A poison job does not walk the fleet (issue 27): a stream whose worker is lost while serving it
`TOKENFAN_MAX_ATTEMPTS` times ends with a non-retryable `error` instead of going to the next worker;
a hand-back on SIGTERM is not a loss."""

from __future__ import annotations

import signal

import redis

from tests.procs import Cluster, Proc, assert_whole, create_stream, logged, read_stream, wait_for
from tokenfan.shared.state import StreamState, StreamStatus

FAST = {"TOKENFAN_LEASE_TTL_S": "1.5", "TOKENFAN_KEEPER_INTERVAL_S": "0.25", "TOKENFAN_MAX_ATTEMPTS": "3",
        "TOKENFAN_FAKE_RATE": "20", "TOKENFAN_FAKE_TOKENS": "400"}


def _serving(r: redis.Redis, sid: str, workers: list[Proc], gone: set[str]) -> Proc | None:
    """The worker now generating the stream (a new one each takeover), once it runs there."""
    state = StreamState.load(r, sid, with_request=False)
    if state is None or state.status is not StreamStatus.RUNNING or state.worker in gone:
        return None
    return next((w for w in workers if w.name == state.worker), None)


def test_a_stream_that_takes_down_max_attempts_workers_is_not_handed_on(cluster: Cluster, r: redis.Redis) -> None:
    cluster.env.update(FAST)
    api = cluster.api()
    workers = [cluster.worker() for _ in range(4)]
    sid = create_stream(api.url, "poison", max_tokens=400)
    gone: set[str] = set()
    for _ in range(3):  # as a job that crashes each worker it reaches would
        victim = wait_for(lambda: _serving(r, sid, workers, gone), timeout=30, what="the stream running on a worker")
        victim.signal(signal.SIGKILL)
        gone.add(victim.name)
    _, got = read_stream(api.url, sid, timeout=30)
    evs = logged(got)
    assert_whole(evs)
    err = evs[-1].json()
    assert evs[-1].event == "error" and err["code"] == "poison_stream" and err["retryable"] is False, err
    assert "3 times" in err["message"] and "TOKENFAN_MAX_ATTEMPTS=3" in err["message"], err
    left = [w for w in workers if w.alive()]
    assert len(left) == 1  # a worker was left, and the stream never reached it:
    assert left[0].name not in {e.json()["worker"] for e in evs if e.event == "meta"}
    state = StreamState.load(r, sid, with_request=False)
    assert state is not None and state.status is StreamStatus.FINISHED and state.worker != left[0].name


def test_hand_backs_on_sigterm_are_not_losses(cluster: Cluster, r: redis.Redis) -> None:
    """Three deploys in a row (each worker SIGTERMed past its grace hands the stream back) with
    TOKENFAN_MAX_ATTEMPTS=3: the stream goes on to its end."""
    cluster.env.update({**FAST, "TOKENFAN_SHUTDOWN_GRACE_S": "0.5", "TOKENFAN_FAKE_TOKENS": "120"})
    api = cluster.api()
    workers = [cluster.worker() for _ in range(4)]
    sid = create_stream(api.url, "deployed thrice", max_tokens=120)
    gone: set[str] = set()
    for _ in range(3):
        victim = wait_for(lambda: _serving(r, sid, workers, gone), timeout=30, what="the stream running on a worker")
        victim.signal(signal.SIGTERM)
        gone.add(victim.name)
    _, got = read_stream(api.url, sid, timeout=30)
    evs = logged(got)
    assert_whole(evs)
    assert evs[-1].event == "done", evs[-1].data
