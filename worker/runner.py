"""One stream's job in the batch: from the payload to exactly one terminal event.

The scheduler (worker/scheduler.py) claims a job when a slot is free and
makes a `StreamJob`; `start` claims nothing more than the stream's lease was
already claimed for, publishes `meta` (and the disclosure) and admits the
request to the engine; each step's text for the stream becomes one token
event (`token_event`, sent with every other slot's in one round trip, then
`sent`); `between` runs between steps (cancel, lost lease, shutdown grace,
time limit); `finish` or `fail` publish the terminal event. `guard` maps any
failure of one stream to that stream's outcome, so it never reaches the
others in the batch.

`run_job` is the function RQ's jobs name; the scheduler never calls it (it
runs each stream in its batch instead), so it only refuses to run outside
`tokenfan worker` (e.g. under a plain `rq worker`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from rq.timeouts import JobTimeoutException

from tokenfan.shared import events, keys
from tokenfan.shared.bus import SyncBus
from tokenfan.shared.errors import ContextLengthExceeded, TokenfanError
from tokenfan.shared.reaper import hand_over, record_error
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.settings import WorkerSettings
from tokenfan.shared.state import JobOutcome, PublishResult, StreamState
from tokenfan.worker.engines import Engine, GenRequest
from tokenfan.worker.keeper import Keeper, Watch
from tokenfan.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class Fenced(Exception):
    """Our lease was taken: another worker or a reaper owns the stream now."""


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The entry RQ's jobs name; tokenfan's scheduler runs them in its batch instead."""
    raise RuntimeError("tokenfan jobs run only inside `tokenfan worker`")


@dataclass
class Runner:
    """What every stream job of a worker shares."""

    settings: WorkerSettings
    engine: Engine
    bus: SyncBus
    keeper: Keeper
    metrics: WorkerMetrics
    name: str
    shutdown_at: float = 0.0

    def reject(self, raw: Any, exc: ValidationError) -> None:
        """An invalid payload is never run; its stream (if it names one) gets an error event."""
        sid = raw.get("stream_id") if isinstance(raw, dict) else None
        log.error("Worker %s: rejected an invalid job for stream %r: %s", self.name, sid, exc.errors()[:3])
        if not isinstance(sid, str) or not sid.replace("-", "").replace("_", "").isalnum() or len(sid) > 64:
            return
        result, seq = self.bus.acquire(sid, self.name, self.settings.lease_ttl_s, self.name)
        if result.claimed:
            msg = "the job's payload is not valid; it was not executed"
            self.bus.publish(sid, self.name, _error(seq + 1, "invalid_job", msg, False))
            record_error(self.bus, sid, "invalid_job", msg)


def _error(seq: int, code: str, message: str, retryable: bool) -> events.Event:
    return events.Event(seq, events.ERROR, {"code": code, "message": message, "retryable": retryable})


class StreamJob:
    """One attempt at one stream, holding its lease, in one of the engine's slots."""

    def __init__(self, runner: Runner, payload: JobPayload, watch: Watch, seq: int) -> None:
        self.r = runner
        self.p = payload
        self.watch = watch
        self.seq = seq
        self.sid = payload.stream_id
        self.started = time.time()
        self.first_token_at = 0.0
        self.generated = 0
        self.prompt_tokens = 0

    def emit(self, kind: str, data: dict[str, Any]) -> PublishResult:
        self.seq += 1
        return self._check(self.r.bus.publish(self.sid, self.r.name, events.Event(self.seq, kind, data)))

    def guard(self, action: Callable[..., JobOutcome | None], *args: Any) -> JobOutcome | None:
        """Run one step of this stream's life; a failure ends this stream (its outcome), never the batch."""
        try:
            return action(*args)
        except Fenced:
            log.warning("Worker %s: lost the lease of stream %s; stopping", self.r.name, self.sid)
            return JobOutcome.HANDED_OVER
        except ContextLengthExceeded as exc:
            return self.fail(exc.code, exc.message, False)
        except JobTimeoutException:
            return self.fail("timeout", "the job ran past its time limit", True)
        except TokenfanError as exc:
            return self.fail(exc.code, exc.message, exc.retryable)
        except redis.RedisError:
            log.exception("Worker %s: Redis failed during stream %s", self.r.name, self.sid)
            return JobOutcome.ERROR
        except Exception as exc:  # the engine is third-party code: any failure ends the stream cleanly
            log.exception("Worker %s: stream %s failed", self.r.name, self.sid)
            return self.fail("engine_error", f"generation failed: {type(exc).__name__}", True)

    def fail(self, code: str, message: str, retryable: bool) -> JobOutcome:
        try:
            self.emit(events.ERROR, {"code": code, "message": message, "retryable": retryable})
            record_error(self.r.bus, self.sid, code, message)
        except (Fenced, redis.RedisError):
            log.warning("Worker %s: could not end stream %s with its error", self.r.name, self.sid)
        return JobOutcome.ERROR

    def start(self) -> JobOutcome | None:
        """Announce the stream and give it a slot; None while it runs."""
        prefix, prefix_tokens, created = self._history()
        resumed = self.seq > 0
        self.emit(events.META, {
            "stream_id": self.sid, "model": self.p.model, "worker": self.r.name,
            "created": created, "resumed": resumed,
        })
        if not resumed and self.p.disclosure:
            self.emit(events.DISCLOSURE, {"text": self.p.disclosure})
        self._mark_served()
        if self.watch.cancel:
            return self.finish("cancelled")
        req = GenRequest(
            messages=[m.model_dump() for m in self.p.messages], max_tokens=self.p.max_tokens,
            temperature=self.p.temperature, top_p=self.p.top_p, stop=self.p.stop, seed=self.p.seed,
            prefix=prefix, prefix_tokens=prefix_tokens,
        )
        self.generated = prefix_tokens
        admission = self.r.engine.admit(self.sid, req)
        self.prompt_tokens = admission.prompt_tokens
        self.r.metrics.cached_tokens.inc(admission.cached_tokens)
        return None

    def _history(self) -> tuple[str, int, float]:
        """Text already sent (a takeover continues it) and the stream's creation time."""
        if self.seq == 0:
            return "", 0, self.p.enqueued_at
        done = self.r.bus.read_log(self.sid)
        texts = [e.data.get("text", "") for e in done if e.type == events.TOKEN]
        created = next((e.data.get("created", 0.0) for e in done if e.type == events.META), self.p.enqueued_at)
        return "".join(texts), len(texts), created

    def _mark_served(self) -> None:
        ticket = StreamState.load_ticket(self.r.bus.redis, self.sid)
        if ticket:
            self.r.bus.mark_served(self.p.model, ticket)

    def token_event(self, text: str) -> events.Event:
        if not self.first_token_at:
            self.first_token_at = time.time()
        return events.Event(self.seq + 1, events.TOKEN, {"text": text})

    def sent(self, result: PublishResult) -> JobOutcome | None:
        """The token event's publish result: it is in the log unless fenced; a cancel ends the stream now."""
        self._check(result)
        self.seq += 1
        self.generated += 1
        if result is PublishResult.CANCELLED:
            return self.finish("cancelled")
        return None

    def _check(self, result: PublishResult) -> PublishResult:
        """A publish's result; our lease was taken when it is FENCED."""
        if result is PublishResult.FENCED:
            raise Fenced(self.sid)
        return result

    def between(self) -> JobOutcome | None:
        """Between two steps: what the keeper saw, the shutdown grace, the time limit."""
        if self.watch.lost:
            raise Fenced(self.sid)
        if self.watch.cancel:
            return self.finish("cancelled")
        shutdown_at = self.r.shutdown_at
        if shutdown_at and time.time() - shutdown_at > self.r.settings.shutdown_grace_s:
            return self.hand_back()
        if time.time() - self.started > self.r.settings.job_timeout_s - 5:
            raise JobTimeoutException("job time limit")
        return None

    def hand_back(self) -> JobOutcome:
        self.r.engine.drop(self.sid)  # its slot must not produce another token for a stream we gave away
        payload = self.p.model_copy(update={"attempt": self.p.attempt + 1})
        if hand_over(self.r.bus, self.r.settings, self.r.name, payload):
            log.warning("Worker %s: shutting down; handed stream %s back for continuation", self.r.name, self.sid)
        return JobOutcome.HANDED_OVER

    def _cancel_reason(self) -> str:
        if self.watch.cancel:
            return self.watch.cancel
        raw = self.r.bus.redis.get(keys.cancel(self.sid))
        return raw.decode() if raw else "client"

    def finish(self, reason: str) -> JobOutcome:
        self.r.engine.drop(self.sid)
        now = time.time()
        gen_s = now - (self.first_token_at or now)
        new_tokens = self.generated
        data: dict[str, Any] = {
            "finish_reason": reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.generated,
                "total_tokens": self.prompt_tokens + self.generated,
            },
            "timings": self._timings(now, gen_s, new_tokens),
        }
        if reason == "cancelled":
            data["cancel_reason"] = self._cancel_reason()
        self.emit(events.DONE, data)
        self.r.bus.redis.zrem(keys.active(), self.sid)
        return JobOutcome.CANCELLED if reason == "cancelled" else JobOutcome.DONE

    def _timings(self, now: float, gen_s: float, tokens: int) -> dict[str, Any]:
        m = self.r.metrics
        queue_wait = max(0.0, self.started - self.p.enqueued_at)
        ttft = (self.first_token_at - self.started) if self.first_token_at else 0.0
        tps = (tokens - 1) / gen_s if gen_s > 0 and tokens > 1 else 0.0
        if self.p.attempt == 0:
            m.queue_wait.observe(queue_wait)
        if self.first_token_at:
            m.ttft.observe(ttft)
        m.tokens.inc(tokens)
        if tps:
            m.tps.observe(tps)
        return {
            "queue_wait_ms": round(queue_wait * 1000, 2),
            "ttft_ms": round(ttft * 1000, 2),
            "gen_ms": round((now - self.started) * 1000, 2),
            "tokens_per_s": round(tps, 2),
            "worker": self.r.name,
        }
