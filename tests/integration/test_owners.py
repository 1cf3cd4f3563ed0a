"""The owners of a stream's lease and lease index, cancel flag and viewer set (shared/leases.py,
shared/cancel.py, shared/viewers.py) on the suite's real Redis: each operation's writes, in the
order the lease index's rule asks (an entry before the claim it covers, removed only at the end)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from tokenfan.shared import cancel, events, keys, viewers
from tokenfan.shared import defaults as d
from tokenfan.shared.bus import PUBLISH, BusConfig, SyncBus
from tokenfan.shared.events import CancelReason, FinishReason
from tokenfan.shared.leases import ACQUIRE, HANDBACK, RECLAIM, RENEW, AsyncLeases, Leases
from tokenfan.shared.state import AcquireResult, PublishResult, StreamState, StreamStatus

SID = "ownerstream000000001"


class Recording(redis.Redis):
    """A client that notes each command it sends (a script call is one EVALSHA)."""

    sent: list[tuple[Any, ...]]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(args)
        return super().execute_command(*args, **options)

    def names(self) -> list[str]:
        """The commands sent since the last look, with a ZADD's flags: ["ZADD GT", "EVALSHA"]."""
        words = [[w.decode() if isinstance(w, bytes) else str(w) for w in args] for args in self.sent]
        out = [" ".join([w[0], *(x for x in w[1:] if x in ("NX", "GT", "LT", "CH"))]) for w in words]
        self.sent.clear()
        return out


@pytest.fixture
def rec(r: redis.Redis, redis_url: str) -> Iterator[Recording]:
    client = Recording.from_url(redis_url)
    client.sent = []
    yield client
    client.close()


@pytest.fixture
def leases(rec: Recording) -> Leases:
    StreamState(model="m", owner="k", request=b"{}").create(rec, SID, 3600)
    for script in (ACQUIRE, RECLAIM, RENEW, HANDBACK, PUBLISH):  # loaded: each call is one EVALSHA
        rec.script_load(script.lua)
    out = Leases(rec)
    rec.names()
    return out


def deadline(r: redis.Redis) -> float | None:
    return r.zscore(keys.LEASES, SID)


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the lease and its index --------------------------------------------------------------------

def test_a_claim_writes_its_index_entry_first_even_when_refused(leases: Leases, rec: Recording, r: redis.Redis) -> None:
    assert leases.claim(SID, "w1", 5.0) == (AcquireResult.QUEUED, 0)
    assert rec.names() == ["ZADD", "EVALSHA"]
    assert now_ms() < (deadline(r) or 0) <= now_ms() + 5000
    rec.zadd(keys.LEASES, {SID: 1})
    assert leases.claim(SID, "w2", 5.0) == (AcquireResult.TAKEN, 0)
    assert (deadline(r) or 0) > now_ms() and rec.get(keys.lease(SID)) == b"w1"


def test_a_claim_only_to_end_writes_no_index_entry(leases: Leases, rec: Recording, r: redis.Redis) -> None:
    assert leases.claim_to_end(SID, "api:cancel", 5.0) == (AcquireResult.QUEUED, 0)
    assert rec.names() == ["EVALSHA"] and deadline(r) is None


def test_a_reaper_covers_the_stream_before_it_takes_it_over(leases: Leases, rec: Recording, r: redis.Redis) -> None:
    covered = leases.cover(SID, 5.0, now_ms())
    assert rec.names() == ["ZADD NX", "ZSCORE"] and covered.deadline_ms == deadline(r)
    rec.zadd(keys.LEASES, {SID: 123})
    assert leases.cover(SID, 5.0, now_ms()).deadline_ms == 123  # an entry it finds keeps its deadline
    seen = StreamState.load(rec, SID)
    assert leases.take_over(covered, "reaper", 5.0, seen) == (AcquireResult.QUEUED, 0)
    rec.names()
    assert leases.take_over(covered, "reaper-b", 5.0, seen) == (AcquireResult.TAKEN, 0)  # no longer as seen


def test_renew_and_hand_back_move_the_deadline_after_the_lease(leases: Leases, rec: Recording, r: redis.Redis) -> None:
    leases.claim(SID, "w1", 5.0)
    rec.names()
    assert leases.renew(SID, "w1", 30.0) and rec.names() == ["EVALSHA", "ZADD"]
    assert (deadline(r) or 0) > now_ms() + 20_000
    assert not leases.renew(SID, "w2", 30.0) and rec.names() == ["EVALSHA"]  # not ours: the index untouched
    assert not leases.hand_back(SID, "w2", 1, 15.0) and rec.names() == ["EVALSHA"]
    assert leases.hand_back(SID, "w1", 1, 15.0) and rec.names() == ["EVALSHA", "ZADD"]
    assert now_ms() + 10_000 < (deadline(r) or 0) <= now_ms() + 15_000  # due if nobody takes it on
    state = StreamState.load(rec, SID)
    assert state is not None and (state.status, state.attempt) == (StreamStatus.QUEUED, 1)
    assert not rec.exists(keys.lease(SID))


def test_a_reclaim_writes_its_entry_first_and_never_earlier(leases: Leases, rec: Recording, r: redis.Redis) -> None:
    leases.claim(SID, "w1", 5.0)
    rec.delete(keys.lease(SID))  # lapsed while Redis was away
    far = now_ms() + 60_000
    rec.zadd(keys.LEASES, {SID: far})
    rec.names()
    assert leases.reclaim(SID, "w1", 5.0, "w1", 0, 0, 0) == (AcquireResult.RUNNING, 0)
    assert rec.names() == ["ZADD GT", "EVALSHA"] and deadline(r) == far


def test_only_a_finished_stream_leaves_the_index(rec: Recording, leases: Leases, r: redis.Redis) -> None:
    bus = SyncBus(rec, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    bus.leases.claim(SID, "w1", 5.0)
    assert bus.publish(SID, "w1", events.Done(1, FinishReason.STOP)) is PublishResult.PUBLISHED
    assert not rec.exists(keys.lease(SID)) and deadline(r) is not None  # the entry outlives the lease...
    assert leases.due(now_ms() + 10_000, 10) == [SID]
    pipe = rec.pipeline(transaction=False)
    Leases.queue_retire(pipe, SID)
    pipe.execute()
    assert deadline(r) is None and leases.due(now_ms() + 10_000, 10) == []  # ...until it is retired


def test_the_sweep_indexes_only_streams_nobody_watches(leases: Leases, rec: Recording, r: redis.Redis) -> None:
    pipe = rec.pipeline(transaction=False)
    Leases.queue_watch(pipe, SID)
    assert Leases.unwatched(*pipe.execute())
    leases.claim(SID, "w1", 5.0)
    pipe = rec.pipeline(transaction=False)
    Leases.queue_watch(pipe, SID)
    assert not Leases.unwatched(*pipe.execute())
    rec.zadd(keys.LEASES, {SID: 7})
    leases.index_now([SID, "other"], 100)
    assert deadline(r) == 7 and rec.zscore(keys.LEASES, "other") == 100  # an entry found meanwhile is kept


@pytest.fixture
async def arec(r: redis.Redis, redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_the_api_repairs_a_silent_stream_through_the_owner(r: redis.Redis, arec: aredis.Redis) -> None:
    owner = AsyncLeases(arec)
    running = StreamState(status=StreamStatus.RUNNING)
    r.set(keys.lease(SID), "w1")
    assert not await owner.repair(SID, running, 15.0) and deadline(r) is None  # a live lease: nothing to do
    r.delete(keys.lease(SID))
    r.zadd(keys.LEASES, {SID: now_ms() + 60_000})
    assert await owner.repair(SID, running, 15.0)  # no lease: made due now
    assert (deadline(r) or 0) <= now_ms()
    assert not await owner.repair(SID, running, 15.0)  # due already
    r.delete(keys.LEASES)
    assert not await owner.repair(SID, StreamState(status=StreamStatus.QUEUED), 15.0) and deadline(r) is None
    assert not await owner.repair(SID, StreamState(status=StreamStatus.QUEUED, attempt=1), 15.0)
    first = deadline(r)
    assert first is not None and now_ms() + 10_000 < first <= now_ms() + 15_000  # handed over: a deadline
    await owner.repair(SID, StreamState(status=StreamStatus.QUEUED, attempt=1), 60.0)
    assert deadline(r) == first  # kept


async def test_the_api_claims_a_queued_stream_only_to_end_it(r: redis.Redis, arec: aredis.Redis) -> None:
    StreamState(model="m", owner="k", request=b"{}").create(r, SID, 3600)
    assert await AsyncLeases(arec).claim_to_end(SID, "api:cancel", 5.0) == (AcquireResult.QUEUED, 0)
    assert r.get(keys.lease(SID)) == b"api:cancel" and deadline(r) is None


# --- the cancel flag ----------------------------------------------------------------------------

async def test_the_first_cancel_reason_stays(r: redis.Redis, arec: aredis.Redis) -> None:
    assert cancel.reason(r, SID) is None
    assert await cancel.arequest(arec, SID, CancelReason.CLIENT, 60)
    assert not cancel.request(r, SID, CancelReason.ABANDONED, 60)
    assert cancel.reason(r, SID) is CancelReason.CLIENT and 0 < r.ttl(keys.cancel(SID)) <= 60
    pipe = r.pipeline(transaction=False)
    cancel.queue_reason(pipe, SID)
    assert [cancel.parse_reason(raw) for raw in pipe.execute()] == [CancelReason.CLIENT]


def test_the_publish_script_answers_cancelled_while_the_flag_is_set(rec: Recording, leases: Leases) -> None:
    bus = SyncBus(rec, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    leases.claim(SID, "w1", 5.0)
    assert bus.publish(SID, "w1", events.Meta(1, SID, "m", "w1", 0.0, False)) is PublishResult.PUBLISHED
    cancel.request(rec, SID, CancelReason.CLIENT, 10 * d.LOG_TTL_S)
    assert bus.publish(SID, "w1", events.Token(2, "x")) is PublishResult.CANCELLED
    assert bus.publish(SID, "w1", events.Done(3, FinishReason.CANCELLED)) is PublishResult.CANCELLED
    assert 0 < rec.ttl(keys.cancel(SID)) <= d.LOG_TTL_S  # expires with the log, not later


# --- the viewer set -----------------------------------------------------------------------------

async def test_viewers_the_placeholder_and_a_background_response(r: redis.Redis, arec: aredis.Redis) -> None:
    pipe = r.pipeline(transaction=False)
    viewers.queue_create(pipe, SID, 600)
    pipe.execute()
    assert r.zrange(keys.viewers(SID), 0, -1) == [viewers.PLACEHOLDER.encode()]
    assert 0 < r.ttl(keys.viewers(SID)) <= 600 and await viewers.acount(arec, SID) == 1
    await viewers.atouch(arec, SID, "v1")
    pipe = r.pipeline(transaction=False)
    viewers.queue_touch(pipe, SID, "v2", now_ms() - 1)  # expired: not counted
    viewers.queue_count(pipe, SID, time.time())
    assert pipe.execute()[-1] == 2
    await viewers.aleave(arec, SID, "v1")  # the first to leave takes the placeholder with it
    assert await viewers.acount(arec, SID) == 0
    pipe = r.pipeline(transaction=False)
    viewers.queue_background(pipe, SID, 600)
    pipe.execute()
    assert await viewers.acount(arec, SID) == 1
    assert r.zscore(keys.viewers(SID), viewers.BACKGROUND) > now_ms() + 500_000
