"""The Redis event bus: publish, log, lease, read back.

Every write a worker makes for one event is one Lua script call, so the
log append, the channel publish, the fencing check against the lease and
the cancel check cost one round trip. Scripts touch only one stream's keys
(one hash slot), so they run unchanged on Redis Cluster.

The log is a Redis Stream whose entry ids are `seq-0`: Redis itself refuses
an id that does not grow, and "events after N" is `XRANGE log (N-0 +`.

The publish script checks each event's `seq` against the log's last one, so
a Redis that restarted from an append-only file lacking the last second, or
a replica promoted with the last writes missing, cannot silently drop or
double an event: an event already in the log is not written again (a retry
after a lost reply), and one that would leave a hole is refused with GAP,
upon which the worker re-sends from the log's end (docs/faults.md).
`reclaim` lets the worker that was generating a stream take its lease back
after such a restart, when nobody else has taken the stream on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from string import Template
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from tokenfan.shared import keys
from tokenfan.shared.defaults import LOG_TTL_REFRESH_EVERY
from tokenfan.shared.events import Event, decode
from tokenfan.shared.state import AcquireResult, Field, PublishResult, StreamState, StreamStatus

# The scripts are the only code that changes a stream's status: its field
# names, status values and the replies they return come from shared/state.py.
_NAMES = {
    "status": Field.STATUS.value, "worker": Field.WORKER.value, "attempt": Field.ATTEMPT.value,
    "queued": StreamStatus.QUEUED.value, "running": StreamStatus.RUNNING.value,
    "finished": StreamStatus.FINISHED.value,
    "missing": AcquireResult.MISSING.value, "taken": AcquireResult.TAKEN.value,
    "fenced": int(PublishResult.FENCED), "gap": int(PublishResult.GAP), "refresh_every": LOG_TTL_REFRESH_EVERY,
}

# The log's last seq, as `last` (0 for an empty or missing log); KEYS[n] is the log.
_LAST_SEQ = """
local top = redis.call('XREVRANGE', KEYS[%d], '+', '-', 'COUNT', 1)
local last = 0
if #top > 0 then last = tonumber(string.match(top[1][1], '^(%%d+)')) end
"""

# The terminal event keeps a stored response's record (keys.response) for the `ttl_s` its JSON starts
# with (api/responses/record.py writes it first, from TOKENFAN_RESPONSE_TTL_S), and copies the log beside it
# (keys.response_log) when that outlives the log; a record without one goes with the log.
PUBLISH_LUA = Template("""
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return $fenced end
""" + _LAST_SEQ % 1 + """
local seq = tonumber(ARGV[2])
if seq <= last then return redis.call('EXISTS', KEYS[5]) end
if seq > last + 1 then return $gap end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], ARGV[2] .. '-0', 'e', ARGV[3])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[4], '$status', '$finished')
  redis.call('DEL', KEYS[3])
  for i = 1, 5 do if i ~= 2 and i ~= 3 then redis.call('EXPIRE', KEYS[i], ARGV[7]) end end
  redis.call('EXPIRE', KEYS[6], ARGV[7])
  local rec = redis.call('GET', KEYS[7])
  local kept = rec and tonumber(string.match(rec, '^{"ttl_s":(%d+)'))
  if kept and kept > 0 then
    if kept > tonumber(ARGV[7]) then
      redis.call('COPY', KEYS[1], KEYS[8], 'REPLACE')
      redis.call('EXPIRE', KEYS[8], kept)
    end
    redis.call('EXPIRE', KEYS[7], kept)
  else
    redis.call('EXPIRE', KEYS[7], ARGV[7])
  end
elseif tonumber(ARGV[2]) % $refresh_every == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
if ARGV[8] == '1' then redis.call('SPUBLISH', KEYS[2], ARGV[3]) else redis.call('PUBLISH', KEYS[2], ARGV[3]) end
return redis.call('EXISTS', KEYS[5])
""").substitute(_NAMES)

# ARGV[4] and ARGV[5], a reaper's: claim only if the stream is still as the reaper saw it (that status
# and attempt), so one that another reaper handed over a moment ago is not taken for one nobody took.
ACQUIRE_LUA = Template("""
local st = redis.call('HMGET', KEYS[2], '$status', '$attempt')
local status = st[1]
if not status then return {'$missing', 0} end
if status == '$finished' then return {'$finished', 0} end
if ARGV[4] and (status ~= ARGV[4] or (tonumber(st[2] or '0') or 0) ~= tonumber(ARGV[5])) then
  return {'$taken', 0}
end
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'$taken', 0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], '$status', '$running', '$worker', ARGV[3])
""" + _LAST_SEQ % 3 + """
return {status, last}
""").substitute(_NAMES)

# The worker that was generating a stream takes its lease back (after Redis restarted, failed over, or
# was out of reach past the lease): only while nobody else has taken the stream on, and only while the
# log ends inside what this worker generated (ARGV[5] <= last seq <= ARGV[6]), so it can re-send the rest.
# A stream still `queued` is ours only when its attempt is ours (the restart lost our claim, and our job
# may be back in the queue: it will find the stream taken and skip it); one a reaper handed over is not,
# even if no worker took it yet: once anyone has taken a worker for lost, it stays fenced. The log's
# last seq comes back with every answer: `finished` with our terminal event in it is our own success.
RECLAIM_LUA = Template("""
""" + _LAST_SEQ % 3 + """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'$taken', last} end
local st = redis.call('HMGET', KEYS[2], '$status', '$worker', '$attempt')
if not st[1] then return {'$missing', last} end
if st[1] == '$finished' then return {'$finished', last} end
local mine, attempt = tonumber(ARGV[4]), tonumber(st[3] or '0') or 0
if not cur then
  if st[1] == '$running' and (st[2] ~= ARGV[3] or attempt ~= mine) then return {'$taken', last} end
  if st[1] == '$queued' and attempt ~= mine then return {'$taken', last} end
end
-- a log past our last seq was written by someone else, unless we hold the lease already: then our
-- other thread (keeper or main loop) took it back first and sent on past the seq this caller read
if last < tonumber(ARGV[5]) or (last > tonumber(ARGV[6]) and cur ~= ARGV[1]) then return {'$taken', last} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], '$status', '$running', '$worker', ARGV[3])
return {st[1], last}
""").substitute(_NAMES)

LAST_SEQ_LUA = _LAST_SEQ % 1 + "return last"

RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

HANDBACK_LUA = Template("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], '$status', '$queued', '$worker', '', '$attempt', ARGV[2])
return 1
""").substitute(_NAMES)

MAX_SET_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class BusConfig:
    """The knobs every publisher shares, taken from Settings once."""

    log_maxlen: int
    log_active_ttl_s: int
    log_ttl_s: int
    sharded: bool = False


def _publish_args(stream_id: str, owner: str, event: Event, cfg: BusConfig) -> tuple[list[str], list[Any]]:
    ks = [
        keys.log(stream_id),
        keys.channel(stream_id),
        keys.lease(stream_id),
        keys.state(stream_id),
        keys.cancel(stream_id),
        keys.viewers(stream_id),
        keys.response(stream_id),
        keys.response_log(stream_id),
    ]
    args = [
        owner,
        event.seq,
        event.encode(),
        cfg.log_maxlen,
        cfg.log_active_ttl_s,
        "1" if event.terminal else "0",
        cfg.log_ttl_s,
        "1" if cfg.sharded else "0",
    ]
    return ks, args


def _entries_to_events(entries: list[Any]) -> list[Event]:
    out = []
    for _id, fields in entries:
        raw = fields.get(b"e") if b"e" in fields else fields.get("e")
        if raw is not None:
            out.append(decode(raw))
    return out


def _as_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _published(reply: Any) -> PublishResult:
    """The publish script's integer reply, as the enum (the one place it is converted)."""
    return PublishResult(int(reply))


def _acquired(reply: Any) -> tuple[AcquireResult, int]:
    status, seq = reply
    return AcquireResult(_as_str(status)), int(seq)


class SyncBus:
    """The worker's side (and the reapers'): blocking redis-py."""

    def __init__(self, redis: Redis, cfg: BusConfig, queue: Redis | None = None) -> None:
        self.redis = redis
        self.queue = queue if queue is not None else redis  # where RQ's queues live
        self.cfg = cfg
        self._publish = redis.register_script(PUBLISH_LUA)
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._reclaim = redis.register_script(RECLAIM_LUA)
        self._last_seq = redis.register_script(LAST_SEQ_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._handback = redis.register_script(HANDBACK_LUA)
        self._max_set = redis.register_script(MAX_SET_LUA)
        self._server: str | None = None  # what back_since() saw last: the run_id, when it came back, the
        self._back_at = float("-inf")  # last failure
        self._unreachable_at = float("-inf")
        self._answered_at: float | None = None  # when a reaper's look (back_since, stalled) last had an answer

    def publish(self, stream_id: str, owner: str, event: Event) -> PublishResult:
        ks, args = _publish_args(stream_id, owner, event, self.cfg)
        return _published(self._publish(keys=ks, args=args))

    def publish_many(self, items: list[tuple[str, str, Event]]) -> list[PublishResult]:
        """(stream id, owner, event) triples in one pipelined round trip: a batch step's tokens of
        every slot (one round trip per node on Redis Cluster). Each is its own script call, fenced by
        its own stream's lease as in `publish`;
        an error reply (NOSCRIPT after a Redis restart, MOVED) runs that one event again through
        `publish`, which loads scripts and follows redirects (the script did not run)."""
        replies: list[Any] = [None] * len(items)
        pipes: dict[int, tuple[Any, list[int]]] = {}  # one plain pipeline per node (cluster pipelines refuse EVALSHA)
        for i, (sid, owner, event) in enumerate(items):
            ks, args = _publish_args(sid, owner, event, self.cfg)
            client = self.redis
            if hasattr(client, "get_node_from_key"):  # Redis Cluster: the node that owns the stream's slot
                client = client.get_node_from_key(ks[0]).redis_connection
            if id(client) not in pipes:
                pipes[id(client)] = (client.pipeline(transaction=False), [])
            pipe, rows = pipes[id(client)]
            pipe.evalsha(self._publish.sha, len(ks), *ks, *args)
            rows.append(i)
        for pipe, rows in pipes.values():
            for i, reply in zip(rows, pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return [self.publish(sid, owner, event) if isinstance(reply, Exception) else _published(reply)
                for (sid, owner, event), reply in zip(items, replies, strict=True)]

    def acquire(self, stream_id: str, owner: str, ttl_s: float, worker: str = "",
                seen: StreamState | None = None) -> tuple[AcquireResult, int]:
        """Claim the stream's lease (a reaper: only while its status and attempt are still those it
        `seen`, else TAKEN); the result, and the last seq in its log."""
        ks = [keys.lease(stream_id), keys.state(stream_id), keys.log(stream_id)]
        args: list[Any] = [owner, int(ttl_s * 1000), worker or owner]
        if seen is not None:
            args += [seen.status.value, seen.attempt]
        return _acquired(self._acquire(keys=ks, args=args))

    def back_since(self, stall_s: float = math.inf) -> float:
        """How long Redis has answered this process without a break: seconds since its run_id changed
        (a restart, a failover), since a `mark_unreachable` call was followed by an answer, or since an
        answer that came more than `stall_s` after the one before (Redis paused: SIGSTOP, a frozen VM;
        the clients' retries make a pause look like one slow answer, no error)."""
        server = self.server_id()
        now = time.monotonic()
        stalled = self._answered_at is not None and now - self._answered_at > stall_s
        self._answered_at = now
        if self._server is None:  # the first look: nothing to compare with yet
            self._server = server
        elif server != self._server or self._unreachable_at > self._back_at or stalled:
            self._server, self._back_at = server, now
        return now - self._back_at

    def stalled(self, stall_s: float) -> bool:
        """Whether more than `stall_s` went by since the last look's answer (Redis paused meanwhile, or
        this process did); a stall counts as Redis coming back at the next `back_since`, and every
        check until then says so too (the pass stops)."""
        now = time.monotonic()
        if self._answered_at is not None and now - self._answered_at > stall_s:
            self.mark_unreachable()
            return True
        self._answered_at = now
        return False

    def mark_unreachable(self) -> None:
        self._unreachable_at = time.monotonic()

    def reclaim(self, stream_id: str, owner: str, ttl_s: float, worker: str, attempt: int, first: int,
                last: int) -> tuple[AcquireResult, int]:
        """Take back the lease of a stream this worker was generating (RECLAIM_LUA says when it may);
        the result, and the log's last seq, from which the worker re-sends. The lease index entry is
        written first, so a claim that lands is always one a reaper can find (never moved earlier: a
        stream handed over keeps its deadline when the claim is refused)."""
        self.redis.zadd(keys.LEASES, {stream_id: int((time.time() + ttl_s) * 1000)}, gt=True)
        ks = [keys.lease(stream_id), keys.state(stream_id), keys.log(stream_id)]
        return _acquired(self._reclaim(keys=ks, args=[owner, int(ttl_s * 1000), worker, attempt, first, last]))

    def last_seq(self, stream_id: str) -> int:
        """The seq of the log's last event (0: empty or gone)."""
        return int(self._last_seq(keys=[keys.log(stream_id)]))

    def server_id(self) -> str:
        """Which Redis process answers (its run_id): it changes when Redis restarts or fails over.
        Empty on Redis Cluster, whose nodes each have their own."""
        if hasattr(self.redis, "get_node_from_key"):
            return ""
        return str(self.redis.info("server").get("run_id", ""))

    def renew(self, stream_id: str, owner: str, ttl_s: float) -> bool:
        ok = self._renew(keys=[keys.lease(stream_id)], args=[owner, int(ttl_s * 1000)])
        if ok:
            self.set_deadline(stream_id, ttl_s)
        return bool(ok)

    def set_deadline(self, stream_id: str, seconds: float) -> None:
        """When reapers should look at this stream again (the lease set's score)."""
        self.redis.zadd(keys.LEASES, {stream_id: int((time.time() + seconds) * 1000)})

    def handback(self, stream_id: str, owner: str, attempt: int) -> bool:
        ks = [keys.lease(stream_id), keys.state(stream_id)]
        return bool(self._handback(keys=ks, args=[owner, attempt]))

    def mark_served(self, model: str, ticket: int) -> None:
        self._max_set(keys=[keys.queue_served(model)], args=[ticket])

    def read_log(self, stream_id: str, after: int = 0) -> list[Event]:
        return _entries_to_events(self.redis.xrange(keys.log(stream_id), f"({after}-0" if after else "-", "+"))

    def state(self, stream_id: str) -> StreamState | None:
        return StreamState.load(self.redis, stream_id)


class AsyncBus:
    """The API's side: redis.asyncio."""

    def __init__(self, redis: AsyncRedis, cfg: BusConfig) -> None:
        self.redis = redis
        self.cfg = cfg
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._publish = redis.register_script(PUBLISH_LUA)
        self._last_seq = redis.register_script(LAST_SEQ_LUA)

    async def last_seq(self, stream_id: str) -> int:
        """The seq of the log's last event (0: empty or gone), read as `SyncBus.last_seq` reads it."""
        return int(await self._last_seq(keys=[keys.log(stream_id)]))

    async def read_log(self, stream_id: str, after: int = 0) -> list[Event]:
        start = f"({after}-0" if after else "-"
        return _entries_to_events(await self.redis.xrange(keys.log(stream_id), start, "+"))

    async def state(self, stream_id: str, *, with_request: bool = True) -> StreamState | None:
        return await StreamState.aload(self.redis, stream_id, with_request=with_request)

    async def acquire(self, stream_id: str, owner: str, ttl_s: float) -> tuple[AcquireResult, int]:
        ks = [keys.lease(stream_id), keys.state(stream_id), keys.log(stream_id)]
        return _acquired(await self._acquire(keys=ks, args=[owner, int(ttl_s * 1000), owner]))

    async def publish(self, stream_id: str, owner: str, event: Event) -> PublishResult:
        ks, args = _publish_args(stream_id, owner, event, self.cfg)
        return _published(await self._publish(keys=ks, args=args))
