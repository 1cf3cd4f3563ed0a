"""Starting, following and cancelling streams from the API's side.

Following a stream is the resume contract of docs/protocol.md: subscribe
first, read the log after the last id the client has, then pass only live
events with a higher `seq`; any sign of a gap (a `seq` that jumps, a
buffer that overflowed, a pub/sub reconnect) sends the follower back to
the log. A follower also keeps the stream's viewer entry fresh and, while
the stream waits in its queue, reports the position.

A Last-Event-ID is ASCII digits and nothing else, from the header or the
query alike (Python's `int()` also takes `+5`, `1_0`, spaces and other
scripts' digits), and at most the highest seq a stream can reach
(`seq_bound`): past that it is refused at once, never sent to Redis (whose
stream ids stop at 2^64). An id the stream has not reached yet can only be
judged when the stream ends: a terminal event at or before it ends the
follower with `invalid_last_event_id`, not with silence.

A follower never waits for ever (issue 16). While Redis is unreachable it
keeps the client's stream open (pings) for `redis_outage_s`, then ends it
with a retryable error; after `LIVENESS_S` without an event it looks at the
stream's record, and a stream that says `running` with no lease (its worker
is gone, and a Redis restart may have lost its lease index entry too) is put
back into the lease index, due now, so the reaper of this very process
hands it over or ends it within a second; a stream `queued` for longer than
`JOB_LOST_AFTER_S` whose job is gone (the restart kept its record but not
its job) is enqueued again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
import orjson
import redis

from tokenfan.api.auth import Principal
from tokenfan.api.edge import Edge
from tokenfan.api.hub import Subscription
from tokenfan.shared import cancel, events, keys, viewers
from tokenfan.shared.defaults import JOB_LOST_AFTER_S, MAX_STREAM_ID_CHARS, SEQ_SLACK
from tokenfan.shared.errors import InvalidRequest, NotFound, Unavailable
from tokenfan.shared.events import CancelReason, Done, Event, FinishReason
from tokenfan.shared.jobs import enqueue
from tokenfan.shared.reaper import requeue_lost
from tokenfan.shared.schema import ChatRequest, JobPayload, check_caps
from tokenfan.shared.settings import ApiSettings
from tokenfan.shared.state import StreamState, StreamStatus

log = logging.getLogger(__name__)

# Silence after which a follower checks that its stream still exists.
LIVENESS_S = 5.0
# Clean-up after a client left may take this long, shielded from cancellation.
CLEANUP_S = 2.0


def new_stream_id() -> str:
    """144 random bits, URL-safe."""
    return secrets.token_urlsafe(18)


@dataclass
class Started:
    stream_id: str
    model: str
    created: int
    sub: Subscription
    state: StreamState


async def start_stream(edge: Edge, req: ChatRequest, who: Principal) -> Started:
    """Validate, admit, subscribe, then enqueue: no first token can be missed."""
    model = await resolve_model(edge, req.model)
    check_caps(req, edge.settings)
    await edge.admission.check_queue(model)
    sid = new_stream_id()
    await edge.admission.admit(who, sid)
    now = time.time()
    payload = JobPayload.from_request(req, stream_id=sid, model=model, settings=edge.settings, now=now)
    try:
        sub = await edge.hub.subscribe(keys.channel(sid))
    except BaseException:
        await edge.admission.release(who, sid)
        raise
    try:
        state = await _create_state(edge, payload, who.owner, req.cancel_on_disconnect)
        await asyncio.to_thread(enqueue, edge.sync_bus.queue, payload, timeout_s=edge.settings.job_timeout_s)
    except BaseException:
        await edge.hub.unsubscribe(sub)
        await edge.admission.release(who, sid)
        raise
    return Started(sid, model, int(now), sub, state)


async def resolve_model(edge: Edge, name: str | None) -> str:
    served = edge.settings.served_models()
    if name is None:
        return served[0]
    if name in served or await edge.live_workers(name):
        return name
    raise NotFound(f"the model '{name}' does not exist or is not served here", code="model_not_found",
                   param="model")


async def _create_state(edge: Edge, payload: JobPayload, owner: str, cancel_on_disconnect: bool) -> StreamState:
    s = edge.settings
    sid = payload.stream_id
    state = StreamState(
        model=payload.model, owner=owner, created=payload.enqueued_at,
        ticket=await edge.redis.incr(keys.queue_ticket(payload.model)),
        cancel_on_disconnect=cancel_on_disconnect, request=orjson.dumps(payload.dump()),
    )
    pipe = edge.redis.pipeline(transaction=False)
    state.create(pipe, sid, s.log_active_ttl_s)
    viewers.queue_create(pipe, sid, s.log_active_ttl_s)
    pipe.zadd(keys.active(), {sid: int(payload.enqueued_at * 1000)})
    await pipe.execute()
    return state


async def load_state(edge: Edge, sid: str, owner: str) -> StreamState:
    """The stream's state, or 404 for a stream that is unknown, expired or someone else's."""
    if not sid or len(sid) > MAX_STREAM_ID_CHARS:
        raise NotFound("no such stream", code="stream_not_found")
    state = await edge.bus.state(sid, with_request=False)
    if state is None or state.owner != owner:
        raise NotFound("no such stream (it never existed, expired, or belongs to another key)",
                       code="stream_not_found")
    return state


async def cancel_stream(edge: Edge, sid: str, owner: str, reason: CancelReason = CancelReason.CLIENT) -> str:
    state = await load_state(edge, sid, owner)
    if state.status is StreamStatus.FINISHED:
        return StreamStatus.FINISHED.value
    await cancel.arequest(edge.redis, sid, reason, edge.settings.log_active_ttl_s)
    if state.status is StreamStatus.QUEUED:
        await _end_queued(edge, sid, reason)
    return "cancelling"


async def _end_queued(edge: Edge, sid: str, reason: CancelReason) -> None:
    """A stream nobody generates yet is ended here; its job is skipped later."""
    owner = f"{edge.name}:cancel"
    result, seq = await edge.bus.leases.claim_to_end(sid, owner, edge.settings.lease_ttl_s)
    if not result.claimed:  # claimed while "running" too: its worker's lease had lapsed
        return
    # the worker's constructor: no usage, no timings (no worker ever had it)
    await edge.bus.publish(sid, owner, Done(seq + 1, FinishReason.CANCELLED, cancel_reason=reason))
    await edge.redis.zrem(keys.active(), sid)


def seq_bound(settings: ApiSettings) -> int:
    """No stream's seq goes past this (defaults.SEQ_SLACK says why)."""
    return settings.max_tokens_cap + SEQ_SLACK


def parse_last_id(header: str | None, query: str | None, bound: int) -> int:
    """The Last-Event-ID header, else the `last_event_id` query parameter; 0 when neither is given."""
    raw = header if header else query
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()):
        raise _bad_last_id("Last-Event-ID must be an event's seq: ASCII digits 0-9 and nothing else")
    if len(raw) > len(str(bound)) or int(raw) > bound:
        raise _bad_last_id(f"Last-Event-ID is past the last event any stream can have ({bound})")
    return int(raw)


def _bad_last_id(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_last_event_id", param="Last-Event-ID")


class Follower:
    """Yields batches of new events (or None on an idle tick) until the terminal event."""

    def __init__(self, edge: Edge, sid: str, last: int, state: StreamState, sub: Subscription | None = None):
        self.edge = edge
        self.sid = sid
        self.last = last
        self.state = state
        self.sub = sub
        self.finished = False
        self.handed_off = False
        self.viewer = secrets.token_hex(6)
        self.cancel_on_disconnect = state.cancel_on_disconnect
        self._heard_at = time.monotonic()
        self._resync = False  # the log must be read before the next live event
        self._outage_since = 0.0  # when Redis started failing (0: it answers)
        self._owner_checked = 0.0  # when `_check_owner` last looked

    async def batches(self) -> AsyncGenerator[list[Event] | None, None]:
        if self.sub is None:
            self.sub = await self.edge.hub.subscribe(keys.channel(self.sid))
        self.edge.viewers.add((self.sid, self.viewer))
        try:
            await self._touch_viewer()
            backlog = self._accept(await self.edge.bus.read_log(self.sid, self.last))
            if backlog:
                yield backlog
            while not self.finished:
                yield await self._next()
        finally:
            self.edge.viewers.discard((self.sid, self.viewer))
            # The client may be gone: Starlette cancels this task, and anyio's
            # cancellation would cancel every await in here too. Shield clean-up.
            with anyio.move_on_after(CLEANUP_S, shield=True):
                await self.edge.hub.unsubscribe(self.sub)

    def _tick(self) -> float:
        if self.state.status is StreamStatus.QUEUED:
            return self.edge.settings.queued_interval_s
        return min(self.edge.settings.heartbeat_s, LIVENESS_S)

    async def _next(self) -> list[Event] | None:
        """The next batch, or None on an idle tick; Redis away for a while is an idle tick too."""
        try:
            got = await self._receive()
        except redis.RedisError as exc:
            self._unreachable(exc)
            return None
        self._outage_since = 0.0
        return got

    async def _receive(self) -> list[Event] | None:
        assert self.sub is not None
        if self._resync:  # a gap whose log read failed (Redis away): read it now
            return self._caught_up(await self.edge.bus.read_log(self.sid, self.last)) or None
        got = await self.sub.get(self._tick())
        if got is None:
            return await self._idle()
        raws, gap = got
        self._heard_at = time.monotonic()
        # One pass (the hottest loop in the API): drop what the client has, and any hole
        # (a seq that is not the one after the last) sends the follower to the log.
        last = expect = self.last
        fresh = []
        for raw in raws:
            e = events.decode(raw)
            if e.seq <= last:
                if e.terminal:  # it ended at or before the client's id
                    raise self._ended_before(e.seq)
                continue
            if e.seq != expect + 1:
                gap = True
            expect = e.seq
            fresh.append(e)
        if gap:
            self._resync = True
            return self._caught_up(await self.edge.bus.read_log(self.sid, self.last))
        return self._accept(fresh)

    def _caught_up(self, logged: list[Event]) -> list[Event]:
        self._resync = False
        return self._accept(logged)

    def _unreachable(self, exc: redis.RedisError) -> None:
        """Redis failed: keep the client waiting (pings) up to `redis_outage_s`, then give up."""
        now = time.monotonic()
        if not self._outage_since:
            self._outage_since = now
            log.warning("API %s: Redis unreachable while following stream %s (%s); waiting up to %gs",
                        self.edge.name, self.sid, exc, self.edge.settings.redis_outage_s)
        if now - self._outage_since > self.edge.settings.redis_outage_s:
            raise exc
        self._resync = True  # whatever was published meanwhile is read from the log

    def _accept(self, batch: list[Event]) -> list[Event]:
        out = []
        for e in batch:
            if e.seq <= self.last:
                if e.terminal:
                    raise self._ended_before(e.seq)
                continue
            out.append(e)
            self.last = e.seq
            if e.terminal:
                self.finished = True
                break
        if out and self.state.status is StreamStatus.QUEUED:
            self.state.status = StreamStatus.RUNNING
        return out

    async def _idle(self) -> list[Event] | None:
        """No event for a tick: refresh what we know, catch up if the log moved on."""
        if self.state.status is not StreamStatus.QUEUED and time.monotonic() - self._heard_at < LIVENESS_S:
            return None
        self._heard_at = time.monotonic()
        fresh = await self.edge.bus.state(self.sid, with_request=False)
        if fresh is None:
            raise Unavailable("the stream's state is gone (Redis lost it); start a new request",
                              code="stream_lost")
        self.state = fresh
        caught_up = self._caught_up(await self.edge.bus.read_log(self.sid, self.last))
        if not caught_up and fresh.ended:  # ended, and nothing in its log after our id
            raise self._ended_before(await self.edge.bus.last_seq(self.sid))
        if not caught_up and time.monotonic() - self._owner_checked >= LIVENESS_S:
            self._owner_checked = time.monotonic()
            await self._check_owner(fresh)
        return caught_up or None

    async def _check_owner(self, state: StreamState) -> None:
        """A silent stream must have someone on it: a running one a live lease, a handed-over one a
        deadline in the lease index. Otherwise the index gets the entry it lacks, and a reaper acts."""
        if await self.edge.bus.leases.repair(self.sid, state, self.edge.settings.failover_wait_s):
            log.warning("API %s: stream %s says running but has no lease and no due index entry; "
                        "reaping it", self.edge.name, self.sid)
        elif state.status is StreamStatus.QUEUED and time.time() - state.created > JOB_LOST_AFTER_S:
            # a restart may have kept it but not its job
            await asyncio.to_thread(requeue_lost, self.edge.sync_bus, self.edge.settings, self.sid)

    def _ended_before(self, seq: int) -> InvalidRequest:
        """The stream ended at `seq`, at or before the client's id: it claimed events that never were."""
        self.finished = True
        return InvalidRequest(f"the stream ended at event {seq}, before the Last-Event-ID {self.last}",
                              code="invalid_last_event_id", param="Last-Event-ID")

    async def queue_position(self) -> int:
        served = await self.edge.redis.get(keys.queue_served(self.state.model))
        return max(0, self.state.ticket - int(served or 0) - 1)

    async def _touch_viewer(self) -> None:
        await viewers.atouch(self.edge.redis, self.sid, self.viewer)

    async def leave(self) -> None:
        """The client went away: drop our viewer entry; maybe cancel."""
        with anyio.move_on_after(CLEANUP_S, shield=True):
            await self._leave()

    async def _leave(self) -> None:
        try:
            r = self.edge.redis
            await viewers.aleave(r, self.sid, self.viewer)
            if self.finished or not self.cancel_on_disconnect:
                return
            if await viewers.acount(r, self.sid) == 0:
                await cancel.arequest(r, self.sid, CancelReason.DISCONNECT, self.edge.settings.log_active_ttl_s)
        except Exception as exc:  # the client is gone; nothing must escape a finally
            log.debug("API %s: leaving stream %s failed: %s", self.edge.name, self.sid, exc)
