"""A stream's status through its life on a real Redis: created by `StreamState`,
changed only by the bus's scripts (acquire, hand back, the terminal publish)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tokenfan.shared import defaults as d
from tokenfan.shared import events
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.state import AcquireResult, PublishResult, StreamState, StreamStatus


@pytest.fixture
def bus(r: redis.Redis, redis_url: str) -> Iterator[SyncBus]:
    client = redis.Redis.from_url(redis_url)
    yield SyncBus(client, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    client.close()


def status(bus: SyncBus, sid: str) -> StreamStatus | None:
    state = bus.state(sid)
    return None if state is None else state.status


def test_a_stream_goes_queued_running_queued_running_finished(bus: SyncBus) -> None:
    created = StreamState(model="m", owner="k", ticket=3, request=b"{}")
    created.create(bus.redis, "s1", d.LOG_ACTIVE_TTL_S)
    assert bus.state("s1") == created and created.status is StreamStatus.QUEUED

    assert bus.leases.claim("s1", "w1", 5.0) == (AcquireResult.QUEUED, 0)
    assert bus.leases.claim("s1", "w2", 5.0) == (AcquireResult.TAKEN, 0)  # w1 holds the lease
    running = bus.state("s1")
    assert running is not None and running.status is StreamStatus.RUNNING and running.worker == "w1"
    assert bus.publish("s1", "w1", events.Meta(1, "s1", "m", "w1", 0.0, False)) is PublishResult.PUBLISHED
    assert bus.publish("s1", "w2", events.Token(2, "x")) is PublishResult.FENCED

    assert bus.leases.hand_back("s1", "w1", attempt=1, wait_s=5.0)
    back = bus.state("s1")
    assert back is not None and (back.status, back.worker, back.attempt) == (StreamStatus.QUEUED, "", 1)

    assert bus.leases.claim("s1", "w2", 5.0) == (AcquireResult.QUEUED, 1)  # continued after the logged event
    assert bus.publish("s1", "w2", events.Done(2, events.FinishReason.STOP)) is PublishResult.PUBLISHED
    assert status(bus, "s1") is StreamStatus.FINISHED
    assert bus.leases.claim("s1", "w3", 5.0) == (AcquireResult.FINISHED, 0)
    assert StreamState.load(bus.redis, "s1", with_request=False) == StreamState(
        model="m", owner="k", status=StreamStatus.FINISHED, worker="w2", ticket=3, attempt=1)


def test_no_record_is_missing_and_claims_nothing(bus: SyncBus) -> None:
    assert bus.leases.claim("nope", "w1", 5.0) == (AcquireResult.MISSING, 0)
    assert bus.state("nope") is None and not AcquireResult.MISSING.claimed
