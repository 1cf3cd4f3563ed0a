"""Running one job: from the payload to exactly one terminal event.

`run_job` is the function RQ calls (by name, with the JSON payload). It
finds the worker's `Runner` through a context variable that the worker
binds around each job, so the model and the Redis clients are made once
per process and never at import time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from rq.timeouts import JobTimeoutException

from tokenfan.shared import events, keys
from tokenfan.shared.bus import SyncBus, TokenPipe
from tokenfan.shared.errors import ContextLengthExceeded, TokenfanError
from tokenfan.shared.reaper import hand_over, record_error
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.settings import WorkerSettings
from tokenfan.shared.state import JobOutcome, PublishResult, StreamState
from tokenfan.worker.engines import Engine, GenRequest
from tokenfan.worker.keeper import Keeper, Watch
from tokenfan.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

CURRENT: ContextVar[Runner] = ContextVar("tokenfan_runner")


class Fenced(Exception):
    """Our lease was taken: another worker or a reaper owns the stream now."""


class HandedBack(Exception):
    """The stream went back to the queue for another worker to continue."""


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ's entry point for every tokenfan job."""
    try:
        runner = CURRENT.get()
    except LookupError:
        raise RuntimeError("tokenfan jobs run only inside `tokenfan worker`") from None
    return runner.run(payload)


@dataclass
class Runner:
    settings: WorkerSettings
    engine: Engine
    bus: SyncBus
    keeper: Keeper
    metrics: WorkerMetrics
    name: str
    shutdown_at: float = 0.0

    @contextmanager
    def bound(self) -> Iterator[None]:
        token = CURRENT.set(self)
        try:
            yield
        finally:
            CURRENT.reset(token)

    def run(self, raw: Any) -> dict[str, Any]:
        try:
            payload = JobPayload.model_validate(raw)
        except ValidationError as exc:
            self._reject(raw, exc)
            return {"outcome": JobOutcome.INVALID.value}
        result, seq = self.bus.acquire(payload.stream_id, self.name, self.settings.lease_ttl_s, self.name)
        if not result.claimed:
            log.info("Worker %s: stream %s is %s; skipping its job", self.name, payload.stream_id, result)
            return {"outcome": JobOutcome.skipped(result).value}
        watch = self.keeper.begin(payload.stream_id, self.name)
        self.metrics.busy.set(1)
        outcome = JobOutcome.ERROR
        try:
            outcome = StreamJob(self, payload, watch, seq).run()
        finally:
            self.metrics.busy.set(0)
            self.keeper.end()
            if outcome is not JobOutcome.HANDED_OVER:
                self.bus.redis.zrem(keys.LEASES, payload.stream_id)
        self.metrics.job(outcome)
        return {"outcome": outcome.value}

    def _reject(self, raw: Any, exc: ValidationError) -> None:
        """An invalid payload is never run; its stream (if it names one) gets an error event."""
        sid = raw.get("stream_id") if isinstance(raw, dict) else None
        log.error("Worker %s: rejected an invalid job for stream %r: %s", self.name, sid, exc.errors()[:3])
        self.metrics.job(JobOutcome.ERROR)  # counted with the errors: the alert on failed jobs sees it
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
    """One attempt at one stream, holding its lease."""

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

    def run(self) -> JobOutcome:
        try:
            return self._run()
        except Fenced:
            log.warning("Worker %s: lost the lease of stream %s; stopping", self.r.name, self.sid)
            return JobOutcome.HANDED_OVER
        except HandedBack:
            return JobOutcome.HANDED_OVER
        except ContextLengthExceeded as exc:
            return self._fail(exc.code, exc.message, False)
        except JobTimeoutException:
            return self._fail("timeout", "the job ran past its time limit", True)
        except TokenfanError as exc:
            return self._fail(exc.code, exc.message, exc.retryable)
        except redis.RedisError:
            log.exception("Worker %s: Redis failed during stream %s", self.r.name, self.sid)
            return JobOutcome.ERROR
        except Exception as exc:  # the engine is third-party code: any failure ends the stream cleanly
            log.exception("Worker %s: stream %s failed", self.r.name, self.sid)
            return self._fail("engine_error", f"generation failed: {type(exc).__name__}", True)

    def _fail(self, code: str, message: str, retryable: bool) -> JobOutcome:
        try:
            self.emit(events.ERROR, {"code": code, "message": message, "retryable": retryable})
            record_error(self.r.bus, self.sid, code, message)
        except (Fenced, redis.RedisError):
            log.warning("Worker %s: could not end stream %s with its error", self.r.name, self.sid)
        return JobOutcome.ERROR

    def _run(self) -> JobOutcome:
        prefix, prefix_tokens, created = self._history()
        resumed = self.seq > 0
        self.emit(events.META, {
            "stream_id": self.sid, "model": self.p.model, "worker": self.r.name,
            "created": created, "resumed": resumed,
        })
        if not resumed and self.p.disclosure:
            self.emit(events.DISCLOSURE, {"text": self.p.disclosure})
        self._mark_served()
        req = GenRequest(
            messages=[m.model_dump() for m in self.p.messages], max_tokens=self.p.max_tokens,
            temperature=self.p.temperature, top_p=self.p.top_p, stop=self.p.stop, seed=self.p.seed,
            prefix=prefix, prefix_tokens=prefix_tokens,
        )
        self.generated = prefix_tokens
        self.prompt_tokens = self.r.engine.prompt_tokens(req)
        reason = self._generate(req)
        return self._finish(reason)

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

    def _generate(self, req: GenRequest) -> str:
        if self.watch.cancel:
            return "cancelled"
        pipe = self.r.bus.token_pipe(self.sid, self.r.name)
        try:
            reason = self._tokens(req, pipe)
            if self._check(pipe.collect()) is PublishResult.CANCELLED:
                return "cancelled"
            return reason
        finally:
            pipe.close()

    def _tokens(self, req: GenRequest, pipe: TokenPipe) -> str:
        """Token events through the pipe: each is sent once the one before it is confirmed."""
        for text, finish in self.r.engine.generate(req):
            if text:
                if not self.first_token_at:
                    self.first_token_at = time.time()
                event = events.Event(self.seq + 1, events.TOKEN, {"text": text})
                if self._check(pipe.send(event)) is PublishResult.CANCELLED:  # the one before saw the cancel: not sent
                    return "cancelled"
                self.seq += 1
                self.generated += 1
            if finish:
                return finish
            self._between_tokens()
            if self.watch.cancel:
                return "cancelled"
        return "stop"

    def _check(self, result: PublishResult) -> PublishResult:
        """A publish's result; our lease was taken when it is FENCED."""
        if result is PublishResult.FENCED:
            raise Fenced(self.sid)
        return result

    def _between_tokens(self) -> None:
        if self.watch.lost:
            raise Fenced(self.sid)
        shutdown_at = self.r.shutdown_at
        if shutdown_at and time.time() - shutdown_at > self.r.settings.shutdown_grace_s:
            self._hand_back()
        if time.time() - self.started > self.r.settings.job_timeout_s - 5:
            raise JobTimeoutException("job time limit")

    def _hand_back(self) -> None:
        payload = self.p.model_copy(update={"attempt": self.p.attempt + 1})
        if hand_over(self.r.bus, self.r.settings, self.r.name, payload):
            log.warning("Worker %s: shutting down; handed stream %s back for continuation", self.r.name, self.sid)
        raise HandedBack(self.sid)

    def _cancel_reason(self) -> str:
        if self.watch.cancel:
            return self.watch.cancel
        raw = self.r.bus.redis.get(keys.cancel(self.sid))
        return raw.decode() if raw else "client"

    def _finish(self, reason: str) -> JobOutcome:
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
