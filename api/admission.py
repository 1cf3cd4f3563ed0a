"""Admission, shared by every API replica through Redis.

- Per key: requests per minute (a fixed one-minute window) and concurrent
  unfinished streams. A key's streams are a sorted set; before admitting,
  the ones that ended (done, cancelled, error, worker lost, expired) are
  pruned by looking at their state, so every way a stream ends releases
  its slot without anyone having to remember to.
- Per model: a bound on the queue's depth; beyond it new requests get 503
  with Retry-After instead of waiting behind a queue that will not drain.
"""

from __future__ import annotations

import time

import redis.asyncio as aredis

from tokenfan.api.auth import Principal
from tokenfan.shared import keys, registry
from tokenfan.shared.defaults import CONCURRENCY_RETRY_S, QUEUE_RETRY_MAX_S, QUEUE_RETRY_S, RATE_WINDOW_S
from tokenfan.shared.errors import Overloaded, RateLimited
from tokenfan.shared.state import StreamState, StreamStatus

ADMIT_LUA = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class Admission:
    """The checks a new stream passes before it is enqueued; made once per API process."""

    def __init__(self, redis: aredis.Redis, queue_redis: aredis.Redis, *, max_queue: int, slot_ttl_s: int) -> None:
        self.redis = redis
        self.queue_redis = queue_redis  # where RQ's queues live
        self.max_queue = max_queue
        self.slot_ttl_s = slot_ttl_s  # a key's set of streams outlives any running stream
        self._admit = redis.register_script(ADMIT_LUA)

    async def check_queue(self, model: str) -> None:
        depth = int(await self.queue_redis.llen(keys.queue_list(model)))
        if depth >= self.max_queue:
            workers = max(1, await registry.live_count(self.redis, model))
            retry = max(1, min(QUEUE_RETRY_MAX_S, QUEUE_RETRY_S * depth // workers))
            raise Overloaded(f"the queue for '{model}' is full ({depth} waiting, bound {self.max_queue}); "
                             "retry later", retry_after=retry)

    async def admit(self, who: Principal, sid: str) -> None:
        rec = who.record
        if rec is None:
            return
        await self._rate(who.owner, rec.rpm)
        await self._prune(who.owner)
        ok = await self._admit(keys=[keys.tenant_streams(who.owner)],
                               args=[rec.max_concurrent, sid, int(time.time() * 1000), self.slot_ttl_s])
        if not ok:
            raise RateLimited(f"this key already has {rec.max_concurrent} streams running (its limit); "
                              "wait for one to end", retry_after=CONCURRENCY_RETRY_S,
                              code="concurrency_limit_exceeded")

    async def check_rate(self, who: Principal) -> None:
        """429 when the key's minute is already used up (counted, as `admit` counts what it refuses for
        the rate): a request refused here costs no parsing (api/bodies.py asks before it reads a body)."""
        rec = who.record
        if rec is None:
            return
        now = time.time()
        count = int(await self.redis.get(keys.rate_window(who.owner, int(now // RATE_WINDOW_S))) or 0)
        if count >= rec.rpm:
            await self.count(who)
            raise RateLimited(f"this key is limited to {rec.rpm} requests per minute",
                              retry_after=max(1, RATE_WINDOW_S - int(now) % RATE_WINDOW_S))

    async def count(self, who: Principal) -> None:
        """Count a request refused for its cost (its checks took a thread a while) in the key's minute,
        as an admitted one is."""
        if who.record is None:
            return
        key = keys.rate_window(who.owner, int(time.time() // RATE_WINDOW_S))
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, RATE_WINDOW_S + 1)
        await pipe.execute()

    async def release(self, who: Principal, sid: str) -> None:
        """A request that failed before its stream existed gives its slot back at once."""
        if who.record is not None:
            await self.redis.zrem(keys.tenant_streams(who.owner), sid)

    async def _rate(self, owner: str, rpm: int) -> None:
        now = time.time()
        window = int(now // RATE_WINDOW_S)
        key = keys.rate_window(owner, window)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, RATE_WINDOW_S + 1)  # the window's counter outlives the window, then goes
        count, _ = await pipe.execute()
        if count > rpm:
            retry = max(1, RATE_WINDOW_S - int(now) % RATE_WINDOW_S)
            raise RateLimited(f"this key is limited to {rpm} requests per minute", retry_after=retry)

    async def _prune(self, owner: str) -> None:
        zkey = keys.tenant_streams(owner)
        members = [m.decode() for m in await self.redis.zrange(zkey, 0, -1)]
        if not members:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sid in members:
            StreamState.queue_status(pipe, sid)
        statuses = [StreamState.parse_status(raw) for raw in await pipe.execute()]
        ended = [sid for sid, st in zip(members, statuses, strict=True) if st in (None, StreamStatus.FINISHED)]
        if ended:
            await self.redis.zrem(zkey, *ended)
