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
from typing import TYPE_CHECKING

from tokenfan.api.auth import Principal
from tokenfan.shared import keys
from tokenfan.shared.errors import Overloaded, RateLimited

if TYPE_CHECKING:
    from tokenfan.api.edge import Edge

ADMIT_LUA = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# Retry-After for a full concurrency slot: streams take seconds, not minutes.
CONCURRENCY_RETRY_S = 5
# Retry-After for a full queue, per queued job per live worker (rough).
QUEUE_RETRY_S = 5


async def check_queue(edge: Edge, model: str) -> None:
    depth = int(await edge.queue_redis.llen(keys.queue_list(model)))
    bound = edge.settings.max_queue
    if depth >= bound:
        workers = max(1, await edge.live_workers(model))
        retry = max(1, min(300, QUEUE_RETRY_S * depth // workers))
        raise Overloaded(f"the queue for '{model}' is full ({depth} waiting, bound {bound}); retry later",
                         retry_after=retry)


async def admit(edge: Edge, who: Principal, sid: str) -> None:
    rec = who.record
    if rec is None:
        return
    await _rate(edge, who.owner, rec.rpm)
    await _prune(edge, who.owner)
    ok = await edge.admit_script(keys=[keys.tenant_streams(who.owner)],
                      args=[rec.max_concurrent, sid, int(time.time() * 1000), edge.settings.log_active_ttl_s])
    if not ok:
        raise RateLimited(f"this key already has {rec.max_concurrent} streams running (its limit); "
                          "wait for one to end", retry_after=CONCURRENCY_RETRY_S, code="concurrency_limit_exceeded")


async def _rate(edge: Edge, owner: str, rpm: int) -> None:
    now = time.time()
    minute = int(now // 60)
    key = keys.rate_window(owner, minute)
    pipe = edge.redis.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, 61)
    count, _ = await pipe.execute()
    if count > rpm:
        raise RateLimited(f"this key is limited to {rpm} requests per minute", retry_after=max(1, 60 - int(now) % 60))


async def _prune(edge: Edge, owner: str) -> None:
    zkey = keys.tenant_streams(owner)
    members = [m.decode() for m in await edge.redis.zrange(zkey, 0, -1)]
    if not members:
        return
    pipe = edge.redis.pipeline(transaction=False)
    for sid in members:
        pipe.hget(keys.state(sid), "status")
    statuses = await pipe.execute()
    ended = [sid for sid, st in zip(members, statuses, strict=True) if st in (None, b"finished")]
    if ended:
        await edge.redis.zrem(zkey, *ended)


async def release(edge: Edge, who: Principal, sid: str) -> None:
    """A request that failed before its stream existed gives its slot back at once."""
    if who.record is not None:
        await edge.redis.zrem(keys.tenant_streams(who.owner), sid)
