"""Ending or handing on streams whose worker stopped renewing its lease.

Every worker and every API process runs `reap` about once a second; the
acquire script makes the claim atomic, so two reapers never both act on a
stream. A reaped stream is continued by another worker (its payload goes
back to the front of its model's queue with `attempt + 1`) or, when
failover is `error`, no live worker serves the model, or the stream has
used up its attempts, ended with a retryable `error` event.
"""

from __future__ import annotations

import logging
import time

import orjson

from tokenfan.shared import events, keys, registry
from tokenfan.shared.bus import SyncBus
from tokenfan.shared.defaults import ERRORS_KEPT, REAP_BATCH
from tokenfan.shared.jobs import enqueue
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.settings import CommonSettings
from tokenfan.shared.state import AcquireResult, PublishResult, StreamState

log = logging.getLogger(__name__)


def reap(bus: SyncBus, settings: CommonSettings, reaper: str) -> int:
    """One pass; returns how many streams it took over or ended."""
    now_ms = int(time.time() * 1000)
    due = bus.redis.zrangebyscore(keys.LEASES, 0, now_ms, start=0, num=REAP_BATCH)
    acted = 0
    for raw in due:
        sid = raw.decode()
        state = bus.state(sid)  # read before the claim, which overwrites its worker
        result, seq = bus.acquire(sid, reaper, settings.lease_ttl_s)
        if result is AcquireResult.TAKEN:
            continue
        bus.redis.zrem(keys.LEASES, sid)
        if not result.claimed or state is None:
            continue
        if result is AcquireResult.QUEUED:  # handed over, but no worker took it in time
            msg = f"no worker took the stream over within {settings.failover_wait_s:g}s"
            end_with_error(bus, sid, reaper, seq, "worker_lost", msg, True)
        else:
            _recover(bus, settings, reaper, sid, seq, state)
        acted += 1
    return acted


def hand_over(bus: SyncBus, settings: CommonSettings, owner: str, payload: JobPayload) -> bool:
    """Put a stream back at the front of its queue for another worker to continue.

    It stays in the lease set with a deadline: if no worker takes it within
    `failover_wait_s`, a reaper ends it with an error instead of leaving it hanging.
    """
    if not bus.handback(payload.stream_id, owner, payload.attempt):
        return False
    bus.set_deadline(payload.stream_id, settings.failover_wait_s)
    enqueue(bus.queue, payload, timeout_s=settings.job_timeout_s, at_front=True)
    return True


def _recover(bus: SyncBus, settings: CommonSettings, reaper: str, sid: str, seq: int, state: StreamState) -> None:
    dead = state.worker
    payload = JobPayload.model_validate(orjson.loads(state.request))
    attempt = max(state.attempt, payload.attempt) + 1
    others = [w for w in registry.live_workers(bus.redis, payload.model) if w != dead]
    can_continue = settings.failover == "continue" and attempt < settings.max_attempts and others
    payload.attempt = attempt
    if can_continue and hand_over(bus, settings, reaper, payload):
        log.warning("Reaper %s: stream %s lost its worker; continuing it (attempt %d)", reaper, sid, attempt)
        return
    why = "no live worker can take it over" if settings.failover == "continue" else "failover is set to error"
    end_with_error(bus, sid, reaper, seq, "worker_lost", f"the worker serving this stream stopped; {why}", True)
    log.warning("Reaper %s: stream %s lost its worker; ended it (%s)", reaper, sid, why)


def end_with_error(bus: SyncBus, sid: str, owner: str, seq: int, code: str, message: str,
                   retryable: bool) -> PublishResult:
    ev = events.Event(seq + 1, events.ERROR, {"code": code, "message": message, "retryable": retryable})
    result = bus.publish(sid, owner, ev)
    record_error(bus, sid, code, message)
    return result


def record_error(bus: SyncBus, sid: str, code: str, message: str) -> None:
    entry = orjson.dumps({"time": time.time(), "stream_id": sid, "code": code, "message": message})
    pipe = bus.redis.pipeline(transaction=False)
    pipe.lpush(keys.errors(), entry)
    pipe.ltrim(keys.errors(), 0, ERRORS_KEPT - 1)
    pipe.zrem(keys.active(), sid)
    pipe.execute()
