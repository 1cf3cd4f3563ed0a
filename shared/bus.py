"""The Redis event bus: publish, log, read back; the owner of a stream's log.

Every write a worker makes for one event is one Lua script call, so the
log append, the channel publish, the fencing check against the lease and
the cancel check cost one round trip. Scripts touch only one stream's keys
(one hash slot), so they run unchanged on Redis Cluster; their keys and
arguments are named (shared/scripts.py). The lease and the lease index are
shared/leases.py's (`SyncBus.leases`, `AsyncBus.leases`).

The log is a Redis Stream whose entry ids are `seq-0`: Redis itself refuses
an id that does not grow, and "events after N" is `XRANGE log (N-0 +`.

The publish script checks each event's `seq` against the log's last one, so
a Redis that restarted from an append-only file lacking the last second, or
a replica promoted with the last writes missing, cannot silently drop or
double an event: an event already in the log is not written again (a retry
after a lost reply), and one that would leave a hole is refused with GAP,
upon which the worker re-sends from the log's end (docs/faults.md).
`Leases.reclaim` lets the worker that was generating a stream take its
lease back after such a restart, when nobody else has taken the stream on.
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
from tokenfan.shared.leases import AsyncLeases, Leases
from tokenfan.shared.scripts import LAST_SEQ, STATE_NAMES, Script
from tokenfan.shared.state import PublishResult, StreamState

# The terminal event keeps a stored response's record (keys.response) for the `ttl_s` its JSON starts
# with (api/responses/record.py writes it first, from TOKENFAN_RESPONSE_TTL_S), and copies the log beside it
# (keys.response_log) when that outlives the log; a record without one goes with the log. It ends the
# lease (shared/leases.py) and expires the cancel flag and the viewer set with the log.
PUBLISH = Script(
    ("log", "channel", "lease", "state", "cancel", "viewers", "response", "response_log"),
    ("owner", "seq", "event", "maxlen", "active_ttl_s", "terminal", "ttl_s", "sharded"),
    Template("""
if redis.call('GET', k_lease) ~= a_owner then return $fenced end
""" + LAST_SEQ + """
local seq = tonumber(a_seq)
if seq <= last then return redis.call('EXISTS', k_cancel) end
if seq > last + 1 then return $gap end
redis.call('XADD', k_log, 'MAXLEN', '~', a_maxlen, a_seq .. '-0', 'e', a_event)
if a_terminal == '1' then
  redis.call('HSET', k_state, '$status', '$finished')
  redis.call('DEL', k_lease)
  for _, k in ipairs({k_log, k_state, k_cancel, k_viewers}) do redis.call('EXPIRE', k, a_ttl_s) end
  local rec = redis.call('GET', k_response)
  local kept = rec and tonumber(string.match(rec, '^{"ttl_s":(%d+)'))
  if kept and kept > 0 then
    if kept > tonumber(a_ttl_s) then
      redis.call('COPY', k_log, k_response_log, 'REPLACE')
      redis.call('EXPIRE', k_response_log, kept)
    end
    redis.call('EXPIRE', k_response, kept)
  else
    redis.call('EXPIRE', k_response, a_ttl_s)
  end
elseif tonumber(a_seq) % $refresh_every == 1 then
  redis.call('EXPIRE', k_log, a_active_ttl_s)
end
if a_sharded == '1' then redis.call('SPUBLISH', k_channel, a_event) else redis.call('PUBLISH', k_channel, a_event) end
return redis.call('EXISTS', k_cancel)
""").substitute(STATE_NAMES, fenced=int(PublishResult.FENCED), gap=int(PublishResult.GAP),
                refresh_every=LOG_TTL_REFRESH_EVERY))

LAST_SEQ_SCRIPT = Script(("log",), (), LAST_SEQ + "return last")

# Raise a model's served mark to `ticket` (never lower it).
MAX_SET = Script(("queue_served",), ("ticket",), """
local cur = tonumber(redis.call('GET', k_queue_served) or '0')
if tonumber(a_ticket) > cur then redis.call('SET', k_queue_served, a_ticket) end
return 1
""")


@dataclass(frozen=True, slots=True)
class BusConfig:
    """The knobs every publisher shares, taken from Settings once."""

    log_maxlen: int
    log_active_ttl_s: int
    log_ttl_s: int
    sharded: bool = False


def _publish_args(stream_id: str, owner: str, event: Event, cfg: BusConfig) -> tuple[tuple[str, ...], list[Any]]:
    """The publish script's KEYS and ARGV for one event (bench/publisher.py sends them too)."""
    return PUBLISH.keys_for(stream_id), PUBLISH.args_for(
        owner=owner, seq=event.seq, event=event.encode(), maxlen=cfg.log_maxlen, active_ttl_s=cfg.log_active_ttl_s,
        terminal="1" if event.terminal else "0", ttl_s=cfg.log_ttl_s, sharded="1" if cfg.sharded else "0")


def _entries_to_events(entries: list[Any]) -> list[Event]:
    out = []
    for _id, fields in entries:
        raw = fields.get(b"e") if b"e" in fields else fields.get("e")
        if raw is not None:
            out.append(decode(raw))
    return out


def _published(reply: Any) -> PublishResult:
    """The publish script's integer reply, as the enum (the one place it is converted)."""
    return PublishResult(int(reply))


class SyncBus:
    """The worker's side (and the reapers'): blocking redis-py."""

    def __init__(self, redis: Redis, cfg: BusConfig, queue: Redis | None = None) -> None:
        self.redis = redis
        self.queue = queue if queue is not None else redis  # where RQ's queues live
        self.cfg = cfg
        self.leases = Leases(redis)
        self._publish = redis.register_script(PUBLISH.lua)
        self._last_seq = redis.register_script(LAST_SEQ_SCRIPT.lua)
        self._max_set = redis.register_script(MAX_SET.lua)
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
                client = client.get_node_from_key(keys.log(sid)).redis_connection
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

    def last_seq(self, stream_id: str) -> int:
        """The seq of the log's last event (0: empty or gone)."""
        return int(LAST_SEQ_SCRIPT.run(self._last_seq, stream_id))

    def server_id(self) -> str:
        """Which Redis process answers (its run_id): it changes when Redis restarts or fails over.
        Empty on Redis Cluster, whose nodes each have their own."""
        if hasattr(self.redis, "get_node_from_key"):
            return ""
        return str(self.redis.info("server").get("run_id", ""))

    def mark_served(self, model: str, ticket: int) -> None:
        MAX_SET.run(self._max_set, model, ticket=ticket)

    def read_log(self, stream_id: str, after: int = 0) -> list[Event]:
        return _entries_to_events(self.redis.xrange(keys.log(stream_id), f"({after}-0" if after else "-", "+"))

    def state(self, stream_id: str) -> StreamState | None:
        return StreamState.load(self.redis, stream_id)


class AsyncBus:
    """The API's side: redis.asyncio."""

    def __init__(self, redis: AsyncRedis, cfg: BusConfig) -> None:
        self.redis = redis
        self.cfg = cfg
        self.leases = AsyncLeases(redis)
        self._publish = redis.register_script(PUBLISH.lua)
        self._last_seq = redis.register_script(LAST_SEQ_SCRIPT.lua)

    async def last_seq(self, stream_id: str) -> int:
        """The seq of the log's last event (0: empty or gone), read as `SyncBus.last_seq` reads it."""
        return int(await LAST_SEQ_SCRIPT.run(self._last_seq, stream_id))

    async def read_log(self, stream_id: str, after: int = 0) -> list[Event]:
        start = f"({after}-0" if after else "-"
        return _entries_to_events(await self.redis.xrange(keys.log(stream_id), start, "+"))

    async def state(self, stream_id: str, *, with_request: bool = True) -> StreamState | None:
        return await StreamState.aload(self.redis, stream_id, with_request=with_request)

    async def publish(self, stream_id: str, owner: str, event: Event) -> PublishResult:
        ks, args = _publish_args(stream_id, owner, event, self.cfg)
        return _published(await self._publish(keys=ks, args=args))
