"""The worker's pipelined token publishes (`SyncBus.token_pipe`) against a real Redis.

One publish is in flight while the next token is generated; these tests
check that order, fencing and cancel stay exact, that a NOSCRIPT reply
(scripts flushed, as after a Redis restart) publishes the event once, and
that the connection goes back to the pool.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tokenfan.shared import defaults as d
from tokenfan.shared import events, keys
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.state import PublishResult, StreamState, StreamStatus

PUBLISHED, CANCELLED, FENCED = PublishResult.PUBLISHED, PublishResult.CANCELLED, PublishResult.FENCED


@pytest.fixture
def bus(r: redis.Redis, redis_url: str) -> Iterator[SyncBus]:
    client = redis.Redis.from_url(redis_url)
    yield SyncBus(client, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    client.close()


def running(r: redis.Redis, sid: str, owner: str = "w1") -> None:
    r.set(keys.lease(sid), owner)
    StreamState(status=StreamStatus.RUNNING, worker=owner).create(r, sid, d.LOG_ACTIVE_TTL_S)


def token(seq: int) -> events.Event:
    return events.Event(seq, events.TOKEN, {"text": f" t{seq}"})


def logged(bus: SyncBus, sid: str) -> list[int]:
    return [e.seq for e in bus.read_log(sid)]


def test_in_order_with_one_in_flight(bus: SyncBus, r: redis.Redis) -> None:
    running(r, "s1")
    pubsub = r.pubsub()
    pubsub.subscribe(keys.channel("s1"))
    pubsub.get_message(timeout=5)  # the subscribe confirmation
    pipe = bus.token_pipe("s1", "w1")
    for seq in range(1, 21):
        assert pipe.send(token(seq)) is PUBLISHED
    assert pipe.collect() is PUBLISHED
    assert pipe.collect() is PUBLISHED  # nothing in flight any more
    pipe.close()
    assert logged(bus, "s1") == list(range(1, 21))
    got = []
    while (msg := pubsub.get_message(timeout=2)) is not None:
        got.append(events.decode(msg["data"]).seq)
    assert got == list(range(1, 21))
    pubsub.close()


def test_cancel_is_seen_one_token_later_and_nothing_more_is_sent(bus: SyncBus, r: redis.Redis) -> None:
    running(r, "s2")
    pipe = bus.token_pipe("s2", "w1")
    assert pipe.send(token(1)) is PUBLISHED
    assert pipe.send(token(2)) is PUBLISHED
    assert pipe.collect() is PUBLISHED  # token 2 is in, before the cancel
    r.set(keys.cancel("s2"), "client")
    assert pipe.send(token(3)) is PUBLISHED  # published; its reply says "cancel requested"...
    assert pipe.send(token(4)) is CANCELLED  # ...which is read here: token 4 is not sent
    pipe.close()
    assert logged(bus, "s2") == [1, 2, 3]


def test_a_lost_lease_fences_and_publishes_nothing(bus: SyncBus, r: redis.Redis) -> None:
    running(r, "s3")
    pipe = bus.token_pipe("s3", "w1")
    assert pipe.send(token(1)) is PUBLISHED
    assert pipe.collect() is PUBLISHED  # token 1 is in, before the takeover
    r.set(keys.lease("s3"), "w2")  # another worker took the stream over
    assert pipe.send(token(2)) is PUBLISHED  # sent; the script refuses it...
    assert pipe.send(token(3)) is FENCED  # ...which is read here: token 3 is not sent
    pipe.close()
    assert logged(bus, "s3") == [1]


def test_noscript_publishes_the_event_once(bus: SyncBus, r: redis.Redis) -> None:
    running(r, "s4")
    pipe = bus.token_pipe("s4", "w1")
    assert pipe.send(token(1)) is PUBLISHED
    assert pipe.collect() is PUBLISHED
    r.script_flush()  # what a Redis restart does to loaded scripts
    assert pipe.send(token(2)) is PUBLISHED
    assert pipe.send(token(3)) is PUBLISHED  # token 2 came back NOSCRIPT and was published again, once
    assert pipe.collect() is PUBLISHED
    pipe.close()
    assert logged(bus, "s4") == [1, 2, 3]


def test_close_waits_for_the_reply_and_returns_the_connection(bus: SyncBus, r: redis.Redis) -> None:
    running(r, "s5")
    pool = bus.redis.connection_pool
    pipe = bus.token_pipe("s5", "w1")
    pipe.send(token(1))
    assert len(pool._in_use_connections) == 1
    pipe.close()
    assert len(pool._in_use_connections) == 0
    # The next publish on the normal path (another connection) lands after it.
    assert bus.publish("s5", "w1", events.Event(2, events.DONE, {"finish_reason": "stop"})) is PUBLISHED
    assert logged(bus, "s5") == [1, 2]
