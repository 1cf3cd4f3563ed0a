"""Ending or handing on streams whose worker stopped renewing its lease.

Every worker and every API process runs `reap` about once a second; the
acquire script makes the claim atomic, so two reapers never both act on a
stream. A reaped stream is continued by another worker (its payload goes
back to the front of its model's queue with `attempt + 1`, where it waits
up to `failover_wait_s` for a worker, a restarted one included) or, when
failover is `error`, ended with a retryable `error` event. A stream whose worker was lost `max_attempts`
times (each died or let the lease lapse while serving it; a hand-back on
SIGTERM is not a loss) is a poison job: it would take the next worker down
the same way, so it ends with a non-retryable `error` `poison_stream`.

Reapers find streams through the lease index, whose entries
shared/leases.py keeps in an order that survives any crash (`cover` before
a reaper's claim, `retire` only once a stream is finished). What can still
lose an entry (a rolled back cluster node, an eviction, a hand) is
repaired by `sweep`: every `sweep_interval_s` one process walks the stream
records and puts each running stream without a lease back into the index,
due now (issue 16: a stream left `running` with no entry was never
reaped), and enqueues again each queued stream whose job is gone
(`requeue_lost`).
"""

from __future__ import annotations

import logging
import time

import orjson
import redis
from rq.job import Job

from tokenfan.shared import events, keys, registry
from tokenfan.shared.bus import SyncBus
from tokenfan.shared.defaults import ERRORS_KEPT, JOB_LOST_AFTER_S, REAP_BATCH, SWEEP_SCAN_COUNT
from tokenfan.shared.jobs import enqueue, stream_job_id
from tokenfan.shared.leases import Leases
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.settings import CommonSettings
from tokenfan.shared.state import AcquireResult, PublishResult, StreamState, StreamStatus

log = logging.getLogger(__name__)

# The error code of a stream that lost `max_attempts` workers (issue 27): retrying it would do the same.
POISON = "poison_stream"


def reap(bus: SyncBus, settings: CommonSettings, reaper: str) -> int:
    """One pass (and a sweep, when it is this process's turn); returns how many streams it took
    over or ended."""
    try:
        if bus.back_since(stall_limit(settings)) < settings.lease_ttl_s:
            return 0  # Redis just came back: no lease could be renewed meanwhile, and their workers go first
        sweep(bus, settings, reaper)
        now_ms = int(time.time() * 1000)
        return sum(reap_one(bus, settings, reaper, sid) for sid in bus.leases.due(now_ms, REAP_BATCH))
    except redis.RedisError:
        bus.mark_unreachable()
        raise


def stall_limit(settings: CommonSettings) -> float:
    """The longest silence of Redis (as this reaper hears it) in which no lease renewed every keeper
    interval can lapse; a longer one may have kept live workers from renewing, so reapers wait a lease
    TTL after it, as after a restart. Floored at two intervals: the gap between two passes is one."""
    return max(settings.lease_ttl_s - 2 * settings.keeper_interval_s, 2 * settings.keeper_interval_s)


def reap_one(bus: SyncBus, settings: CommonSettings, reaper: str, sid: str) -> bool:
    """Take over or end one stream whose lease lapsed (or that was handed over and never taken);
    False when it needs nothing (a live lease, finished, gone)."""
    state = bus.state(sid)  # read before the claim, which overwrites its worker
    now_ms = int(time.time() * 1000)
    # the index entry before the claim (kept when the stream was found there): whatever this
    # process does next, a claim it leaves behind is one the next reaper finds
    covered = bus.leases.cover(sid, settings.lease_ttl_s, now_ms)
    if state is not None and state.status is StreamStatus.QUEUED and covered.deadline_ms > now_ms:
        return False  # handed over a moment ago (its deadline is ahead): not ours to end yet
    if bus.stalled(stall_limit(settings)):
        return False  # Redis paused in this pass: its leases may have lapsed under live workers
    result, seq = bus.leases.take_over(covered, reaper, settings.lease_ttl_s, seen=state)
    if result is AcquireResult.TAKEN:
        return False
    if not result.claimed or state is None:
        bus.leases.retire(sid)
        return False
    if result is AcquireResult.QUEUED:  # handed over, but no worker took it in time
        msg = f"no worker took the stream over within {settings.failover_wait_s:g}s"
        end_with_error(bus, sid, reaper, seq, "worker_lost", msg, True)
        log.warning("Reaper %s: stream %s was handed over and no worker took it; ended it", reaper, sid)
    else:
        _recover(bus, settings, reaper, sid, seq, state)
    return True


def sweep(bus: SyncBus, settings: CommonSettings, who: str) -> int:
    """Put every running stream that has no lease and no lease index entry back into the index, due
    now (one process per `sweep_interval_s` does it); returns how many it put back."""
    if not bus.redis.set(keys.SWEEP, who, nx=True, px=int(settings.sweep_interval_s * 1000)):
        return 0
    found = 0
    batch: list[str] = []
    for key in bus.redis.scan_iter(match=keys.state("*"), count=SWEEP_SCAN_COUNT, _type="hash"):
        batch.append(keys.stream_id_of(key.decode()))
        if len(batch) >= SWEEP_SCAN_COUNT:
            found += _sweep_batch(bus, settings, batch)
            batch = []
    if batch:
        found += _sweep_batch(bus, settings, batch)
    if found:
        log.warning("Reaper %s: %d running streams had no lease and no index entry; reaping them", who, found)
    return found


def _sweep_batch(bus: SyncBus, settings: CommonSettings, sids: list[str]) -> int:
    pipe = bus.redis.pipeline(transaction=False)
    for sid in sids:
        StreamState.queue_summary(pipe, sid)
        Leases.queue_watch(pipe, sid)
    replies = pipe.execute()
    now = time.time()
    lost: list[str] = []
    for i, sid in enumerate(sids):
        summary, leased, indexed = replies[3 * i:3 * i + 3]
        state = StreamState.parse_summary(summary)
        if state is None:
            continue
        if state.status is StreamStatus.RUNNING and Leases.unwatched(leased, indexed):
            lost.append(sid)
        elif state.status is StreamStatus.QUEUED and now - state.created > JOB_LOST_AFTER_S:
            requeue_lost(bus, settings, sid)
    if lost:
        bus.leases.index_now(lost, int(now * 1000))
    return len(lost)


def requeue_lost(bus: SyncBus, settings: CommonSettings, sid: str) -> bool:
    """A queued stream whose job is gone is enqueued again (at the front: it waited already). The API
    writes a stream's record before its job, so a Redis restarted from an append-only file that lacks
    the last second can hold the one without the other; the acquire script makes a doubled job harmless
    (the second finds the stream taken or finished and is skipped)."""
    summary = StreamState.load(bus.redis, sid, with_request=False)
    if summary is None or summary.status is not StreamStatus.QUEUED or time.time() - summary.created < JOB_LOST_AFTER_S:
        return False
    if Job.exists(stream_job_id(sid, summary.attempt), connection=bus.queue):
        return False
    state = bus.state(sid)
    if state is None or state.status is not StreamStatus.QUEUED:
        return False
    payload = JobPayload.model_validate(orjson.loads(state.request))
    payload.attempt = state.attempt  # a handed-over stream's job is its next attempt's
    enqueue(bus.queue, payload, timeout_s=settings.job_timeout_s, at_front=True)
    log.warning("Reaper: queued stream %s had lost its job (a Redis restart?); enqueued it again", sid)
    return True


def hand_over(bus: SyncBus, settings: CommonSettings, owner: str, payload: JobPayload) -> bool:
    """Put a stream back at the front of its queue for another worker to continue.

    It stays in the lease index with a deadline: if no worker takes it within
    `failover_wait_s`, a reaper ends it with an error instead of leaving it hanging.
    """
    if not bus.leases.hand_back(payload.stream_id, owner, payload.attempt, settings.failover_wait_s):
        return False
    enqueue(bus.queue, payload, timeout_s=settings.job_timeout_s, at_front=True)
    return True


def _recover(bus: SyncBus, settings: CommonSettings, reaper: str, sid: str, seq: int, state: StreamState) -> None:
    dead = state.worker
    lost = StreamState.count_loss(bus.redis, sid)
    if lost >= settings.max_attempts:  # a poison job must not walk the fleet
        msg = (f"this stream's worker stopped while serving it (it died or let its lease lapse) {lost} times, on "
               f"{lost} workers; it is not handed on again (TOKENFAN_MAX_ATTEMPTS={settings.max_attempts})")
        end_with_error(bus, sid, reaper, seq, POISON, msg, False)
        log.error("Reaper %s: stream %s lost its worker %d times (last %s); ended it as a poison stream", reaper,
                  sid, lost, dead)
        return
    payload = JobPayload.model_validate(orjson.loads(state.request))
    attempt = max(state.attempt, payload.attempt) + 1
    payload.attempt = attempt
    # Handed over even when no other worker is live now: a supervisor (tokenfan up, Kubernetes, systemd)
    # restarts a dead worker within seconds, and `failover_wait_s` bounds the wait for one.
    if settings.failover == "continue" and hand_over(bus, settings, reaper, payload):
        others = [w for w in registry.live_workers(bus.redis, payload.model) if w != dead]
        log.warning("Reaper %s: stream %s lost its worker %s; continuing it (attempt %d, %d other live workers)",
                    reaper, sid, dead, attempt, len(others))
        return
    why = "failover is set to error" if settings.failover == "error" else "it could not be handed over"
    end_with_error(bus, sid, reaper, seq, "worker_lost", f"the worker serving this stream stopped; {why}", True)
    log.warning("Reaper %s: stream %s lost its worker; ended it (%s)", reaper, sid, why)


def end_with_error(bus: SyncBus, sid: str, owner: str, seq: int, code: str, message: str,
                   retryable: bool) -> PublishResult:
    result = bus.publish(sid, owner, events.Error(seq + 1, code, message, retryable))
    record_error(bus, sid, code, message)
    if result is not PublishResult.FENCED:
        bus.leases.retire(sid)  # finished: only now may its index entry go
    return result


def record_error(bus: SyncBus, sid: str, code: str, message: str) -> None:
    entry = orjson.dumps({"time": time.time(), "stream_id": sid, "code": code, "message": message})
    pipe = bus.redis.pipeline(transaction=False)
    pipe.lpush(keys.errors(), entry)
    pipe.ltrim(keys.errors(), 0, ERRORS_KEPT - 1)
    pipe.zrem(keys.active(), sid)
    pipe.execute()
