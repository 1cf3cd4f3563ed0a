"""The keeper stops renewing for a main loop that makes no progress (issue 27), on the suite's real Redis:
a worker wedged in a call that never returns must let its streams go to other workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from tokenfan.shared import defaults as d
from tokenfan.shared import keys
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.settings import WorkerSettings
from tokenfan.shared.state import AcquireResult, StreamState
from tokenfan.worker.keeper import Keeper
from tokenfan.worker.metrics import WorkerMetrics

STALL_S = 0.3
LEASE_S = 5.0


@pytest.fixture
def keeper(r: redis.Redis, redis_url: str) -> Iterator[Keeper]:
    client = redis.Redis.from_url(redis_url)
    bus = SyncBus(client, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    settings = WorkerSettings(redis_url=redis_url, loop_stall_s=STALL_S, lease_ttl_s=LEASE_S)
    StreamState(model=settings.model, owner="k", ticket=1, request=b"{}").create(client, "s1", d.LOG_ACTIVE_TTL_S)
    assert bus.leases.claim("s1", "w1", LEASE_S) == (AcquireResult.QUEUED, 0)
    yield Keeper(bus, settings, "w1", WorkerMetrics(settings.model))
    client.close()


def wait_for(cond: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_stuck_loop_lets_its_leases_and_heartbeat_lapse_and_a_moving_one_renews_again(
        keeper: Keeper, r: redis.Redis) -> None:
    keeper.begin("s1", "w1")
    r.pexpire(keys.lease("s1"), 1000)
    keeper.tick()
    assert r.pttl(keys.lease("s1")) > 1000 and r.exists(keys.worker("w1"))  # a loop that moves: renewed

    wait_for(keeper.stalled)  # no turn of the loop for STALL_S
    r.pexpire(keys.lease("s1"), 1000)
    r.delete(keys.worker("w1"))
    keeper.tick()
    assert 0 < r.pttl(keys.lease("s1")) <= 1000, "a stuck loop's lease was renewed"
    assert not r.exists(keys.worker("w1")), "a stuck loop's worker still heartbeats"

    keeper.progress()  # the loop moves again: what is still ours is renewed
    assert not keeper.stalled()
    keeper.tick()
    assert r.pttl(keys.lease("s1")) > 1000 and r.exists(keys.worker("w1"))


def test_an_idle_worker_is_never_stalled(keeper: Keeper) -> None:
    keeper.begin("s1", "w1")  # a turn of the loop
    keeper.end("s1")
    since = time.monotonic()
    wait_for(lambda: time.monotonic() - since > STALL_S)
    assert not keeper.stalled()  # no stream held: a loop waiting on the queue is not stuck
