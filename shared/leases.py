"""A stream's lease and the lease index, owned here.

The lease (`keys.lease(id)`, SET PX) names the one process that may write
the stream's events; the publish script (shared/bus.py) checks it for every
event and deletes it with the terminal one. The lease index
(`keys.LEASES`, stream id -> deadline in ms) is how reapers find the
streams to look at (shared/reaper.py). Nothing else reads or writes either:
every claim, renewal, hand-back and index entry is an operation here.

The index is a second record beside each stream's own, on another hash
slot (no script can write both), so its writes keep an order that survives
any crash:

- an entry is written before the claim it covers: `claim` and `reclaim`
  write it themselves, and a reaper's `take_over` takes the `Covered` that
  `cover` returns, so a claim that lands is always one a reaper can find;
- it is removed only once its stream is finished (`retire`), never between
  a claim and a hand-over.

A Redis that restarts from an append-only file holds a prefix of what was
written, so it holds the entry of every stream it says is running. What can
still lose an entry (a rolled back cluster node, an eviction, a hand) is
repaired by the sweep (`queue_watch`, `index_now`) and by the API's
followers (`AsyncLeases.repair`).

`claim_to_end` alone claims without an entry: its caller publishes the
stream's terminal event at once (an invalid job's error, a queued stream's
cancel). A crash between the two leaves a running stream without a lease
once it lapses, which the sweep puts back into the index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from string import Template
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from tokenfan.shared import keys
from tokenfan.shared.scripts import LAST_SEQ, STATE_NAMES, Script
from tokenfan.shared.state import AcquireResult, StreamState, StreamStatus

# Claim the lease for `owner`. `seen_status` and `seen_attempt`, a reaper's: claim only if the stream
# is still as the reaper saw it, so one that another reaper handed over a moment ago is not taken for
# one nobody took.
ACQUIRE = Script(("lease", "state", "log"), ("owner", "ttl_ms", "worker", "seen_status", "seen_attempt"),
                 Template("""
local st = redis.call('HMGET', k_state, '$status', '$attempt')
local status = st[1]
if not status then return {'$missing', 0} end
if status == '$finished' then return {'$finished', 0} end
if a_seen_status and (status ~= a_seen_status or (tonumber(st[2] or '0') or 0) ~= tonumber(a_seen_attempt)) then
  return {'$taken', 0}
end
local cur = redis.call('GET', k_lease)
if cur and cur ~= a_owner then return {'$taken', 0} end
redis.call('SET', k_lease, a_owner, 'PX', a_ttl_ms)
redis.call('HSET', k_state, '$status', '$running', '$worker', a_worker)
""").substitute(STATE_NAMES) + LAST_SEQ + """
return {status, last}
""")

# The worker that was generating a stream takes its lease back (after Redis restarted, failed over, or
# was out of reach past the lease): only while nobody else has taken the stream on, and only while the
# log ends inside what this worker generated (a_first <= last seq <= a_last), so it can re-send the rest.
# A stream still `queued` is ours only when its attempt is ours (the restart lost our claim, and our job
# may be back in the queue: it will find the stream taken and skip it); one a reaper handed over is not,
# even if no worker took it yet: once anyone has taken a worker for lost, it stays fenced. The log's
# last seq comes back with every answer: `finished` with our terminal event in it is our own success.
RECLAIM = Script(("lease", "state", "log"), ("owner", "ttl_ms", "worker", "attempt", "first", "last"),
                 LAST_SEQ + Template("""
local cur = redis.call('GET', k_lease)
if cur and cur ~= a_owner then return {'$taken', last} end
local st = redis.call('HMGET', k_state, '$status', '$worker', '$attempt')
if not st[1] then return {'$missing', last} end
if st[1] == '$finished' then return {'$finished', last} end
local mine, attempt = tonumber(a_attempt), tonumber(st[3] or '0') or 0
if not cur then
  if st[1] == '$running' and (st[2] ~= a_worker or attempt ~= mine) then return {'$taken', last} end
  if st[1] == '$queued' and attempt ~= mine then return {'$taken', last} end
end
-- a log past our last seq was written by someone else, unless we hold the lease already: then our
-- other thread (keeper or main loop) took it back first and sent on past the seq this caller read
if last < tonumber(a_first) or (last > tonumber(a_last) and cur ~= a_owner) then return {'$taken', last} end
redis.call('SET', k_lease, a_owner, 'PX', a_ttl_ms)
redis.call('HSET', k_state, '$status', '$running', '$worker', a_worker)
return {st[1], last}
""").substitute(STATE_NAMES))

RENEW = Script(("lease",), ("owner", "ttl_ms"), """
if redis.call('GET', k_lease) ~= a_owner then return 0 end
redis.call('PEXPIRE', k_lease, a_ttl_ms)
return 1
""")

HANDBACK = Script(("lease", "state"), ("owner", "attempt"), Template("""
if redis.call('GET', k_lease) ~= a_owner then return 0 end
redis.call('DEL', k_lease)
redis.call('HSET', k_state, '$status', '$queued', '$worker', '', '$attempt', a_attempt)
return 1
""").substitute(STATE_NAMES))


def _ms(ttl_s: float) -> int:
    return int(ttl_s * 1000)


def _deadline_ms(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


def _as_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _acquired(reply: Any) -> tuple[AcquireResult, int]:
    status, seq = reply
    return AcquireResult(_as_str(status)), int(seq)


@dataclass(frozen=True, slots=True)
class Covered:
    """A stream's index entry, written (or found there) before a reaper's claim: `take_over` needs one."""

    stream_id: str
    deadline_ms: float  # the entry's deadline as read back (0: gone again meanwhile)


class Leases:
    """The lease and the index through blocking redis-py: the worker's side and the reapers'."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._acquire = redis.register_script(ACQUIRE.lua)
        self._reclaim = redis.register_script(RECLAIM.lua)
        self._renew = redis.register_script(RENEW.lua)
        self._handback = redis.register_script(HANDBACK.lua)

    # --- claims: each writes (or needs) the index entry first -------------------------------------

    def claim(self, stream_id: str, owner: str, ttl_s: float) -> tuple[AcquireResult, int]:
        """A worker's claim of a stream its job names: the index entry (due when the lease would lapse),
        then the lease; the result, and the log's last seq."""
        self.set_deadline(stream_id, ttl_s)
        return self._claim(stream_id, owner, ttl_s)

    def claim_to_end(self, stream_id: str, owner: str, ttl_s: float) -> tuple[AcquireResult, int]:
        """Claim a stream only to publish its terminal event next (no index entry: the module says why)."""
        return self._claim(stream_id, owner, ttl_s)

    def cover(self, stream_id: str, ttl_s: float, now_ms: int) -> Covered:
        """A reaper's first step: an index entry due a lease TTL from `now_ms` unless the stream has
        one (then it keeps its deadline), and that entry's deadline as it stands."""
        self.redis.zadd(keys.LEASES, {stream_id: now_ms + _ms(ttl_s)}, nx=True)
        return Covered(stream_id, self.redis.zscore(keys.LEASES, stream_id) or 0)

    def take_over(self, covered: Covered, reaper: str, ttl_s: float,
                  seen: StreamState | None) -> tuple[AcquireResult, int]:
        """A reaper's claim, only while the stream's status and attempt are still those it `seen`
        (else TAKEN); the result, and the log's last seq."""
        seen_status, seen_attempt = (seen.status.value, seen.attempt) if seen is not None else (None, None)
        return _acquired(ACQUIRE.run(self._acquire, covered.stream_id, owner=reaper, ttl_ms=_ms(ttl_s),
                                     worker=reaper, seen_status=seen_status, seen_attempt=seen_attempt))

    def reclaim(self, stream_id: str, owner: str, ttl_s: float, worker: str, attempt: int, first: int,
                last: int) -> tuple[AcquireResult, int]:
        """Take back the lease of a stream this worker was generating (RECLAIM says when it may); the
        result, and the log's last seq, from which the worker re-sends. The index entry first, never
        moved earlier (ZADD GT): a stream handed over keeps its deadline when the claim is refused."""
        self.redis.zadd(keys.LEASES, {stream_id: _deadline_ms(ttl_s)}, gt=True)
        return _acquired(RECLAIM.run(self._reclaim, stream_id, owner=owner, ttl_ms=_ms(ttl_s), worker=worker,
                                     attempt=attempt, first=first, last=last))

    def _claim(self, stream_id: str, owner: str, ttl_s: float) -> tuple[AcquireResult, int]:
        return _acquired(ACQUIRE.run(self._acquire, stream_id, owner=owner, ttl_ms=_ms(ttl_s), worker=owner,
                                     seen_status=None, seen_attempt=None))

    # --- holding and letting go -------------------------------------------------------------------

    def renew(self, stream_id: str, owner: str, ttl_s: float) -> bool:
        """Extend our lease, then its index deadline; False when the lease is not ours (any more)."""
        ok = RENEW.run(self._renew, stream_id, owner=owner, ttl_ms=_ms(ttl_s))
        if ok:
            self.set_deadline(stream_id, ttl_s)
        return bool(ok)

    def hand_back(self, stream_id: str, owner: str, attempt: int, wait_s: float) -> bool:
        """Give up our lease and queue the stream again as `attempt`; it keeps its index entry, due in
        `wait_s`, so a reaper ends it if no worker takes it by then. False when the lease is not ours."""
        if not HANDBACK.run(self._handback, stream_id, owner=owner, attempt=attempt):
            return False
        self.set_deadline(stream_id, wait_s)
        return True

    def set_deadline(self, stream_id: str, seconds: float) -> None:
        """When reapers should look at this stream again (its index entry's score)."""
        self.redis.zadd(keys.LEASES, {stream_id: _deadline_ms(seconds)})

    def retire(self, stream_id: str) -> None:
        """Drop the stream's index entry: only once its terminal event is in its log (or it is gone)."""
        self.redis.zrem(keys.LEASES, stream_id)

    @staticmethod
    def queue_retire(pipe: Any, stream_id: str) -> None:
        """`retire` queued on a pipeline."""
        pipe.zrem(keys.LEASES, stream_id)

    # --- what reapers and the sweep read ------------------------------------------------------------

    def due(self, now_ms: int, count: int) -> list[str]:
        """Up to `count` streams whose deadline has passed."""
        return [_as_str(raw) for raw in self.redis.zrangebyscore(keys.LEASES, 0, now_ms, start=0, num=count)]

    @staticmethod
    def queue_watch(pipe: Any, stream_id: str) -> None:
        """Queue the reads of whether anyone watches the stream (its lease, its index entry): two
        replies, which `unwatched` reads."""
        pipe.exists(keys.lease(stream_id))
        pipe.zscore(keys.LEASES, stream_id)

    @staticmethod
    def unwatched(leased: Any, indexed: Any) -> bool:
        """From `queue_watch`'s replies: neither a lease nor an index entry."""
        return not leased and indexed is None

    def index_now(self, stream_ids: list[str], now_ms: int) -> None:
        """Index streams found without a lease or an entry, due now (unless one got an entry meanwhile)."""
        self.redis.zadd(keys.LEASES, dict.fromkeys(stream_ids, now_ms), nx=True)


class AsyncLeases:
    """The API's side, through redis.asyncio: it ends queued streams and repairs silent ones."""

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis
        self._acquire = redis.register_script(ACQUIRE.lua)

    async def claim_to_end(self, stream_id: str, owner: str, ttl_s: float) -> tuple[AcquireResult, int]:
        """`Leases.claim_to_end`."""
        return _acquired(await ACQUIRE.run(self._acquire, stream_id, owner=owner, ttl_ms=_ms(ttl_s), worker=owner,
                                           seen_status=None, seen_attempt=None))

    async def repair(self, stream_id: str, state: StreamState, wait_s: float) -> bool:
        """A silent stream must have someone on it: a running one a live lease, a handed-over one a
        deadline in the index. A running one without a lease is made due now (True: a reaper acts
        within a pass); a handed-over one without an entry gets one `wait_s` ahead."""
        if state.status is StreamStatus.RUNNING and not await self.redis.exists(keys.lease(stream_id)):
            return bool(await self.redis.zadd(keys.LEASES, {stream_id: _deadline_ms(0)}, lt=True, ch=True))
        if state.status is StreamStatus.QUEUED and state.attempt > 0:
            await self.redis.zadd(keys.LEASES, {stream_id: _deadline_ms(wait_s)}, nx=True)
        return False
