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
import queue
import signal
import threading
import time
from collections.abc import Callable
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
from tokenfan.shared.redisconn import last_tries
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.state import JobOutcome
from tokenfan.worker.runner import Fenced, Runner, StreamJob

log = logging.getLogger(__name__)

# How long an idle worker blocks waiting for a job (RQ's BLPOP takes whole
# seconds): also how soon an idle worker notices SIGTERM.
IDLE_DEQUEUE_S = 1
# RQ's own worker heartbeat (its worker key's TTL is 420 s); ours is the keeper's.
RQ_HEARTBEAT_S = 60.0
# At exit, how long the books' thread may take to finish the ended jobs' bookkeeping.
BOOKS_JOIN_S = 10.0


@dataclass(eq=False)
class Run:
    """A claimed job as RQ sees it; its execution record is made on the books' thread."""

    job: Job
    queue: Queue
    execution: Execution | None = None


@dataclass(eq=False)
class Active:
    """A claimed job and its stream in a slot."""

    run: Run
    stream: StreamJob


class Scheduler:
    def __init__(self, runner: Runner, worker: SimpleWorker, queue: Queue) -> None:
        self.r = runner
        self.worker = worker
        self.queue = queue
        self.active: dict[str, Active] = {}
        self._rq_beat = 0.0
        self._rq_state: WorkerStatus | None = None
        self.books = Books(runner.name)

    # --- the loop ------------------------------------------------------------

    def run(self) -> None:
        self._signals()
        self.worker.register_birth()
        self.r.metrics.slots.set(self.r.engine.slots)
        self.books.start()
        try:
            while not (self.r.shutdown_at and not self.active):
                self.r.keeper.progress()
                self._claim()
                self._between()
                if self.active:
                    self._step()
        finally:
            for a in list(self.active.values()):  # only after a bug: give every stream a chance elsewhere
                self._close(a, a.stream.guard(a.stream.hand_back) or JobOutcome.HANDED_OVER)
            # Every stream has ended or gone back: what is left is bookkeeping that expires by itself.
            last_tries(self.worker.connection)
            self.books.close(BOOKS_JOIN_S)
            try:
                self.worker.register_death()
            except redis.RedisError as exc:
                log.warning("Worker %s: could not deregister from RQ (%s); RQ's record of it expires on its own",
                            self.r.name, exc)

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
        while self.r.engine.free() > 0 and not self.r.shutdown_at and not self._waiting():
            got = self._dequeue(None if self.active else IDLE_DEQUEUE_S)
            if got is None:
                return
            self._start(*got)

    def _waiting(self) -> bool:
        """A stream of several choices waits for its slots: no other job may take them first."""
        return any(a.stream.waiting for a in self.active.values())

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
            if not self.r.shutdown_at:
                time.sleep(IDLE_DEQUEUE_S)
            return None
        return got

    def _start(self, job: Job, queue: Queue) -> None:
        """Claim the job's stream and give it a slot. What only RQ's registries and the queue-position
        estimate need (RQ's execution records, the queue's served mark) goes to the books' thread, in
        order before the job's end there: a new stream waits for its claim, not for RQ."""
        job.started_at = now()
        try:
            opened = self._open(job)
        except redis.RedisError as exc:  # a claim that landed is in the lease index: a reaper takes it on
            log.error("Worker %s: Redis failed starting job %s: %s", self.r.name, job.id, exc)
            return
        if isinstance(opened, JobOutcome):
            self.r.metrics.job(opened)
            self.books.submit(self._skipped, job, queue, opened)
            return
        a = Active(Run(job, queue), opened)
        self.books.submit(self._rq_started, a.run)
        self.books.submit(opened.mark_served)
        self.active[opened.sid] = a
        self._occupancy()

    def _rq_started(self, run: Run) -> None:
        try:
            run.execution = self.worker.prepare_execution(run.job)
            self.worker.prepare_job_execution(run.job, remove_from_intermediate_queue=True)
        except redis.RedisError as exc:
            log.warning("Worker %s: could not mark job %s started in RQ: %s", self.r.name, run.job.id, exc)

    def _skipped(self, job: Job, queue: Queue, outcome: JobOutcome) -> None:
        run = Run(job, queue)
        self._rq_started(run)
        self._finalize(run, outcome)

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
        result, seq = self.r.bus.leases.claim(sid, self.r.name, self.r.settings.lease_ttl_s)
        if not result.claimed:
            log.info("Worker %s: stream %s is %s; skipping its job", self.r.name, sid, result)
            return JobOutcome.skipped(result)
        stream = StreamJob(self.r, payload, self.r.keeper.begin(sid, self.r.name, payload.attempt, seq), seq)
        outcome = stream.guard(stream.start)
        if outcome is not None:
            if self._release(stream, outcome):
                stream.settle()
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
            if out.text or out.logprobs:
                a.stream.token_event(out.text, out.logprobs, out.index)
            if out.error is not None:
                err = out.error
                a.stream.guard(a.stream.fail, err.code, err.message, err.retryable)
            elif out.finish:
                a.stream.guard(a.stream.choice_done, out.index, out.finish)
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
        """The slot is free for the next job at once; the Redis and RQ bookkeeping of the end (several
        round trips that no stream waits for) goes to the books' thread, off the decode loop."""
        if self.active.pop(a.stream.sid, None) is None:
            return
        outcome = outcome or JobOutcome.ERROR
        settled = self._release(a.stream, outcome)
        self.r.metrics.job(outcome)
        self.books.submit(self._after, a, outcome, settled)
        self._occupancy()

    def _after(self, a: Active, outcome: JobOutcome, settled: bool) -> None:
        if settled:
            a.stream.settle()
        self._finalize(a.run, outcome)

    def _release(self, stream: StreamJob, outcome: JobOutcome) -> bool:
        """The slot and the watch go; the lease index entry only with a confirmed terminal event (any
        other end leaves the stream to the reapers, which find it there). Returns whether it settled."""
        self.r.engine.drop(stream.sid)
        self.r.keeper.end(stream.sid)
        if stream.settled:
            self.r.keeper.hold(stream.sid, stream.p.attempt, stream.base, stream.history)
            return True
        return False

    def _finalize(self, run: Run, outcome: JobOutcome) -> None:
        """RQ's end of a job, as its `perform_job` does for a job that returned (the outcome is its result)."""
        if run.execution is None:  # RQ never recorded its start (Redis failed): nothing to end there
            return
        result: dict[str, Any] = {"outcome": outcome.value}
        try:
            self.worker._finalize_success(run.job, run.queue, run.execution, result)
        except redis.RedisError:
            log.warning("Worker %s: could not mark job %s finished in RQ", self.r.name, run.job.id)

    def _occupancy(self) -> None:
        n = len(self.active)
        self.r.metrics.slots_busy.set(n)
        self.r.metrics.busy.set(1 if n else 0)
        state = WorkerStatus.BUSY if n else WorkerStatus.IDLE
        if state == self._rq_state:  # a round trip only when RQ's view changes, not per job
            return
        try:
            self.worker.set_state(state)
            self._rq_state = state
        except redis.RedisError:
            pass  # RQ's worker state is informational; the keeper's heartbeat is what liveness reads


class Books(threading.Thread):
    """The end of each job in Redis and RQ (its records cleared, RQ's registries and result), in the
    order the jobs ended, on a thread of its own: sixteen streams ending in one step cost the decode
    loop nothing, where they cost it some 100 round trips (measured: 64 ms p50 from a job's enqueue to
    its claim at 16 slots, 1 thread, with them on the loop). RQ's worker and redis-py's pools take
    calls from two threads; what this thread touches of a job, the loop has let go of."""

    def __init__(self, name: str) -> None:
        super().__init__(name=f"tokenfan-books-{name}", daemon=True)
        self.todo: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.todo.put((fn, args))

    def run(self) -> None:
        while (item := self.todo.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except Exception:  # one job's bookkeeping must not stop the others'
                log.exception("Worker: the bookkeeping of an ended job failed")

    def close(self, timeout: float) -> None:
        """Finish what is queued (before the worker deregisters), then stop."""
        self.todo.put(None)
        self.join(timeout)
