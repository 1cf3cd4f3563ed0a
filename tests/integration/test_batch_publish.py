"""One step's token events of every slot in one round trip (`SyncBus.publish_many`), on a real Redis:
each is still fenced by its own stream's lease and sees its own stream's cancel."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tokenfan.shared import defaults as d
from tokenfan.shared import events, keys
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.state import PublishResult, StreamState, StreamStatus


@pytest.fixture
def bus(r: redis.Redis, redis_url: str) -> Iterator[SyncBus]:
    client = redis.Redis.from_url(redis_url)
    yield SyncBus(client, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    client.close()


def running(r: redis.Redis, sid: str, owner: str) -> None:
    r.set(keys.lease(sid), owner)
    StreamState(status=StreamStatus.RUNNING, worker=owner).create(r, sid, d.LOG_ACTIVE_TTL_S)


def token(seq: int, text: str) -> events.Token:
    return events.Token(seq, text)


def texts(bus: SyncBus, sid: str) -> list[str]:
    return [e.text for e in bus.read_log(sid) if isinstance(e, events.Token)]


def test_each_event_is_fenced_and_cancelled_by_its_own_stream(bus: SyncBus, r: redis.Redis) -> None:
    for sid in ("a" * 16, "b" * 16, "c" * 16):
        running(r, sid, "w1")
    r.set(keys.lease("b" * 16), "someone-else")  # b's lease was taken
    r.set(keys.cancel("c" * 16), "client")
    got = bus.publish_many([("a" * 16, "w1", token(1, "x")), ("b" * 16, "w1", token(1, "y")),
                            ("c" * 16, "w1", token(1, "z"))])
    assert got == [PublishResult.PUBLISHED, PublishResult.FENCED, PublishResult.CANCELLED]
    assert texts(bus, "a" * 16) == ["x"] and texts(bus, "b" * 16) == [] and texts(bus, "c" * 16) == ["z"]


def test_after_a_script_flush_every_event_is_published_once(bus: SyncBus, r: redis.Redis) -> None:
    sids = [c * 16 for c in "pq"]
    for sid in sids:
        running(r, sid, "w1")
    assert bus.publish_many([(s, "w1", token(1, "one")) for s in sids]) == [PublishResult.PUBLISHED] * 2
    r.script_flush()  # as after a Redis restart: NOSCRIPT for every call of the pipeline
    assert bus.publish_many([(s, "w1", token(2, "two")) for s in sids]) == [PublishResult.PUBLISHED] * 2
    assert all(texts(bus, s) == ["one", "two"] for s in sids)


def test_nothing_to_publish(bus: SyncBus) -> None:
    assert bus.publish_many([]) == []
