"""The worker's main loop: RQ jobs in, one batch of streams decoded per step.

RQ's workers run one job at a time (`SimpleWorker`) or fork one per job
(`Worker`, which would reload the model and must never touch a GPU context
after fork). Neither fits a batch, so this loop replaces `work()` and does
what RQ's own worker does around each job, with RQ's own methods, for up to
`slots` jobs at once:

- claim a job only when a slot is free (`Queue.dequeue_any`: blocking for a
  second when idle, non-blocking between steps when busy), so the queue's
  depth stays the number of waiting streams (KEDA scales on it);
- mark it started (`prepare_execution`, `prepare_job_execution`: job status,
  `StartedJobRegistry`, the worker's current executions), and when its
  stream ends mark it finished with its outcome (`_finalize_success`, as
  `perform_job` does), so `rq info` and the registries show every stream;
- between claims, one `engine.step()`; all of that step's token events are
  published in one pipelined round trip (`SyncBus.publish_many`), each
  fenced by its own stream's lease.

Leases, cancels and abandoned streams are the keeper's thread's (one watch
per stream). SIGTERM (or SIGINT): no new job; streams go on to their end, and
whatever still runs after the grace period is handed back (a second signal
hands back at once). SIGKILL leaves leases to lapse: the reapers continue
every stream on another worker, or end it with a retryable error.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import redis
from pydantic import ValidationError
from rq import SimpleWorker
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import WorkerStatus

from tokenfan.shared import keys
from tokenfan.shared.events import Event
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.state import JobOutcome
from tokenfan.worker.engines import Output
from tokenfan.worker.runner import Runner, StreamJob

log = logging.getLogger(__name__)

# How long an idle worker blocks waiting for a job (RQ's BLPOP takes whole
# seconds): also how soon an idle worker notices SIGTERM.
IDLE_DEQUEUE_S = 1
# RQ's own worker heartbeat (its worker key's TTL is 420 s); ours is the keeper's.
RQ_HEARTBEAT_S = 60.0


@dataclass(eq=False)
class Active:
    """A claimed job and its stream in a slot."""

    job: Job
    queue: Queue
    execution: Execution
    stream: StreamJob


class Scheduler:
    def __init__(self, runner: Runner, worker: SimpleWorker, queue: Queue) -> None:
        self.r = runner
        self.worker = worker
        self.queue = queue
        self.active: dict[str, Active] = {}
        self._rq_beat = 0.0

    # --- the loop ------------------------------------------------------------

    def run(self) -> None:
        self._signals()
        self.worker.register_birth()
        self.r.metrics.slots.set(self.r.engine.slots)
        try:
            while not (self.r.shutdown_at and not self.active):
                self._claim()
                self._between()
                if self.active:
                    self._step()
        finally:
            for a in list(self.active.values()):  # only after a bug: give every stream a chance elsewhere
                self._close(a, a.stream.guard(a.stream.hand_back) or JobOutcome.HANDED_OVER)
            self.worker.register_death()

    def _signals(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.r.shutdown_at:
            self.r.shutdown_at = time.time()
            log.warning("Worker %s: stop requested; taking no new job, %d streams to finish within %gs",
                        self.r.name, len(self.active), self.r.settings.shutdown_grace_s)
        else:  # asked twice: do not wait out the grace period
            self.r.shutdown_at = time.time() - self.r.settings.shutdown_grace_s - 1

    # --- jobs in -------------------------------------------------------------

    def _claim(self) -> None:
        while self.r.engine.free() > 0 and not self.r.shutdown_at:
            got = self._dequeue(None if self.active else IDLE_DEQUEUE_S)
            if got is None:
                return
            self._start(*got)

    def _dequeue(self, timeout: int | None) -> tuple[Job, Queue] | None:
        now = time.monotonic()
        if now - self._rq_beat > RQ_HEARTBEAT_S:
            self._rq_beat = now
            self.worker.heartbeat()
        try:
            got: tuple[Job, Queue] | None = Queue.dequeue_any([self.queue], timeout, connection=self.worker.connection,
                                                              serializer=JSONSerializer)
        except DequeueTimeout:
            return None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.error("Worker %s: cannot reach the queue's Redis: %s", self.r.name, exc)
            time.sleep(IDLE_DEQUEUE_S)
            return None
        return got

    def _start(self, job: Job, queue: Queue) -> None:
        execution = self.worker.prepare_execution(job)
        self.worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
        job.started_at = now()
        opened = self._open(job)
        if isinstance(opened, JobOutcome):
            self.r.metrics.job(opened)
            self._finalize(job, queue, execution, opened)
            return
        self.active[opened.sid] = Active(job, queue, execution, opened)
        self._occupancy()

    def _open(self, job: Job) -> StreamJob | JobOutcome:
        raw = job.args[0] if job.args else None
        try:
            payload = JobPayload.model_validate(raw)
        except ValidationError as exc:
            self.r.reject(raw, exc)
            return JobOutcome.INVALID
        sid = payload.stream_id
        if sid in self.active:  # a second job for a stream this worker serves
            return JobOutcome.SKIPPED_TAKEN
        result, seq = self.r.bus.acquire(sid, self.r.name, self.r.settings.lease_ttl_s, self.r.name)
        if not result.claimed:
            log.info("Worker %s: stream %s is %s; skipping its job", self.r.name, sid, result)
            return JobOutcome.skipped(result)
        stream = StreamJob(self.r, payload, self.r.keeper.begin(sid, self.r.name), seq)
        outcome = stream.guard(stream.start)
        if outcome is not None:
            self._release(stream, outcome)
            return outcome
        return stream

    # --- the step ------------------------------------------------------------

    def _between(self) -> None:
        for a in list(self.active.values()):
            outcome = a.stream.guard(a.stream.between)
            if outcome is not None:
                self._close(a, outcome)

    def _step(self) -> None:
        outs = self.r.engine.step()
        st = self.r.engine.last
        self.r.metrics.step(st.streams, st.prefill, st.decode, st.seconds)
        sends: list[tuple[Active, Event]] = []
        ends: dict[str, Output] = {}
        for out in outs:
            a = self.active.get(out.key)
            if a is None:
                continue
            if out.text:
                sends.append((a, a.stream.token_event(out.text)))
            if out.finish or out.error:
                ends[out.key] = out
        self._publish(sends, ends)
        for key, out in ends.items():
            a = self.active[key]
            if out.error is not None:
                err = out.error
                self._close(a, a.stream.guard(a.stream.fail, err.code, err.message, err.retryable))
            else:
                self._close(a, a.stream.guard(a.stream.finish, out.finish))

    def _publish(self, sends: list[tuple[Active, Event]], ends: dict[str, Output]) -> None:
        """One round trip for the step's tokens; a stream fenced or cancelled by it ends here."""
        try:
            results = self.r.bus.publish_many([(a.stream.sid, self.r.name, ev) for a, ev in sends])
        except redis.RedisError:
            log.exception("Worker %s: Redis failed publishing a step's tokens", self.r.name)
            for a, _ in sends:
                ends.pop(a.stream.sid, None)
                self._close(a, JobOutcome.ERROR)
            return
        for (a, _), result in zip(sends, results, strict=True):
            outcome = a.stream.guard(a.stream.sent, result)
            if outcome is not None:
                ends.pop(a.stream.sid, None)
                self._close(a, outcome)

    # --- jobs out ------------------------------------------------------------

    def _close(self, a: Active, outcome: JobOutcome | None) -> None:
        if self.active.pop(a.stream.sid, None) is None:
            return
        outcome = outcome or JobOutcome.ERROR
        self._release(a.stream, outcome)
        self.r.metrics.job(outcome)
        self._finalize(a.job, a.queue, a.execution, outcome)
        self._occupancy()

    def _release(self, stream: StreamJob, outcome: JobOutcome) -> None:
        self.r.engine.drop(stream.sid)
        self.r.keeper.end(stream.sid)
        if outcome is not JobOutcome.HANDED_OVER:
            try:
                self.r.bus.redis.zrem(keys.LEASES, stream.sid)
            except redis.RedisError:
                log.warning("Worker %s: could not clear the lease entry of stream %s", self.r.name, stream.sid)

    def _finalize(self, job: Job, queue: Queue, execution: Execution, outcome: JobOutcome) -> None:
        """RQ's end of a job, as its `perform_job` does for a job that returned (the outcome is its result)."""
        result: dict[str, Any] = {"outcome": outcome.value}
        try:
            self.worker._finalize_success(job, queue, execution, result)
        except redis.RedisError:
            log.warning("Worker %s: could not mark job %s finished in RQ", self.r.name, job.id)

    def _occupancy(self) -> None:
        n = len(self.active)
        self.r.metrics.slots_busy.set(n)
        self.r.metrics.busy.set(1 if n else 0)
        try:
            self.worker.set_state(WorkerStatus.BUSY if n else WorkerStatus.IDLE)
        except redis.RedisError:
            pass  # RQ's worker state is informational; the keeper's heartbeat is what liveness reads
