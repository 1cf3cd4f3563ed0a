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
- between claims, one `engine.step()`; every event Redis has not confirmed
  yet (that step's tokens, a terminal event, whatever waited while Redis was
  away) is published in one pipelined round trip (`SyncBus.publish_many`),
  each fenced by its own stream's lease and checked against its log's last
  seq; a job ends when its terminal event is confirmed (worker/runner.py).

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

from tokenfan.shared.events import Event
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.state import JobOutcome
from tokenfan.worker.runner import Fenced, Runner, StreamJob

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
        try:
            if now - self._rq_beat > RQ_HEARTBEAT_S:
                self._rq_beat = now
                self.worker.heartbeat()
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
        try:
            execution = self.worker.prepare_execution(job)
            self.worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
            job.started_at = now()
            opened = self._open(job)
        except redis.RedisError as exc:  # a claim that landed is in the lease index: a reaper takes it on
            log.error("Worker %s: Redis failed starting job %s: %s", self.r.name, job.id, exc)
            return
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
        # The lease index entry before the claim: a claim that lands is always one a reaper can find.
        self.r.bus.set_deadline(sid, self.r.settings.lease_ttl_s)
        result, seq = self.r.bus.acquire(sid, self.r.name, self.r.settings.lease_ttl_s, self.r.name)
        if not result.claimed:
            log.info("Worker %s: stream %s is %s; skipping its job", self.r.name, sid, result)
            return JobOutcome.skipped(result)
        stream = StreamJob(self.r, payload, self.r.keeper.begin(sid, self.r.name, payload.attempt, seq), seq)
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
        for out in outs:
            a = self.active.get(out.key)
            if a is None:
                continue
            if out.text:
                a.stream.token_event(out.text)
            if out.error is not None:
                err = out.error
                a.stream.guard(a.stream.fail, err.code, err.message, err.retryable)
            elif out.finish:
                a.stream.guard(a.stream.finish, out.finish)
        self._publish()
        for a in [a for a in self.active.values() if a.stream.settled]:
            self._close(a, a.stream.outcome)

    def _publish(self) -> None:
        """One round trip for every event Redis has not confirmed (a step's tokens, and a terminal
        event in the same trip); a stream fenced by it ends here. Redis unreachable: the events wait
        for the next step, for `redis_outage_s` at most."""
        sends = [(a, ev) for a in list(self.active.values()) for ev in a.stream.unsent()]
        if not sends:
            return
        try:
            results = self.r.bus.publish_many([(a.stream.sid, self.r.name, ev) for a, ev in sends])
        except redis.RedisError as exc:
            self._unreachable(sends, exc)
            return
        resynced: set[str] = set()
        for (a, ev), result in zip(sends, results, strict=True):
            if a.stream.sid in resynced or a.stream.sid not in self.active:
                continue
            try:
                if a.stream.ack(ev, result):
                    resynced.add(a.stream.sid)
            except Fenced:
                log.warning("Worker %s: stream %s is someone else's now; stopping", self.r.name, a.stream.sid)
                self._close(a, JobOutcome.HANDED_OVER)
            except redis.RedisError as exc:  # Redis failing again in the resync: try again next step
                resynced.add(a.stream.sid)
                self._unreachable([(a, ev)], exc)

    def _unreachable(self, sends: list[tuple[Active, Event]], exc: redis.RedisError) -> None:
        now = time.time()
        streams = {a.stream.sid: a for a, _ in sends}
        log.warning("Worker %s: Redis unreachable publishing %d events of %d streams (%s); they wait",
                    self.r.name, len(sends), len(streams), exc)
        for a in streams.values():
            if a.stream.unreachable(now):
                log.error("Worker %s: Redis unreachable for over %gs; leaving stream %s to the reapers",
                          self.r.name, self.r.settings.redis_outage_s, a.stream.sid)
                self._close(a, JobOutcome.ERROR)

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
        """The slot and the watch go; the lease index entry only with a confirmed terminal event (any
        other end leaves the stream to the reapers, which find it there)."""
        self.r.engine.drop(stream.sid)
        self.r.keeper.end(stream.sid)
        if stream.settled:
            stream.settle()
            self.r.keeper.hold(stream.sid, stream.p.attempt, stream.base, stream.history)

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
