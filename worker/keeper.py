"""The keeper: a worker's background thread for everything that must go on
while the model holds the main thread (prefill can take seconds).

About once a second it heartbeats the worker's registry entry, renews the
lease of every stream its slots are generating, notices a cancel flag or a
stream with no viewer left (and flags it abandoned), reaps lapsed leases
of other workers and, once per `sweep_interval_s` across the fleet,
rebuilds the lease index from the stream records (shared/reaper.py). The
main thread's loop sees what it learnt between decode steps (each stream's
`Watch`); no lock is needed, since each field has one writer and the set of
watches is replaced, never changed in place.

The main loop reports each turn (`progress`). A loop that finished no turn
for `loop_stall_s` while it holds streams is stuck (a call into llama.cpp
that never returns: Python cannot interrupt it): the keeper then stops
renewing its leases and its heartbeat, so the reapers hand its streams on
or end them, and nothing is routed to a worker that serves nobody. It goes
on again if the loop comes back; whatever it then sends of a stream taken
over is fenced.

A lease that could not be renewed (Redis was unreachable past its TTL, or
restarted without it) is taken back when nobody else took the stream on
(`Leases.reclaim`); only when that is refused is the stream lost.

It also holds the events of streams that finished in the last
`DURABLE_AFTER_S` (`hold`): when Redis answers with another run_id than
before (it restarted, or a replica took over), the writes of the last
second or two may be gone, so each held stream whose log lacks its end is
taken back and its missing events sent again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import redis

from tokenfan.shared import cancel, registry, viewers
from tokenfan.shared.bus import SyncBus
from tokenfan.shared.defaults import DURABLE_AFTER_S
from tokenfan.shared.events import CancelReason, Event
from tokenfan.shared.reaper import reap
from tokenfan.shared.settings import WorkerSettings
from tokenfan.shared.state import AcquireResult, PublishResult
from tokenfan.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass
class Watch:
    """A stream being generated, and what the keeper learnt about it."""

    stream_id: str
    owner: str
    attempt: int = 0  # the job's attempt, and the log's last seq when it claimed the stream...
    base: int = 0
    last: int = 0  # ...and the last seq it made (the main thread's): what a reclaim may find in the log
    cancel: CancelReason | None = None
    lost: bool = False
    no_viewer_since: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Held:
    """A finished stream's events, kept until Redis has surely kept them."""

    stream_id: str
    attempt: int
    base: int
    history: list[Event]
    since: float

    @property
    def last(self) -> int:
        return self.base + len(self.history)


class Keeper(threading.Thread):
    def __init__(self, bus: SyncBus, settings: WorkerSettings, name: str, metrics: WorkerMetrics) -> None:
        super().__init__(name=f"keeper-{name}", daemon=True)
        self.bus = bus
        self.settings = settings
        self.worker = name
        self.metrics = metrics
        self.watches: dict[str, Watch] = {}
        self.jobs = 0
        self.started = time.time()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._stop_evt = threading.Event()
        self._held: dict[str, Held] = {}
        self._held_lock = threading.Lock()  # the main thread adds, this thread expires
        self._server = ""  # the run_id of the Redis last seen
        self._progress_at = time.monotonic()  # the main loop's last turn (its thread writes, this one reads)
        self._stalled = False
        self.metrics_port = settings.metrics_port  # the port the exporter got (worker/main.py)

    def progress(self) -> None:
        """The main loop finished a turn (a step, or a pass with nothing to step)."""
        self._progress_at = time.monotonic()

    def stalled(self) -> bool:
        """Whether the main loop holds streams and has finished no turn for `loop_stall_s`."""
        return bool(self.watches) and time.monotonic() - self._progress_at > self.settings.loop_stall_s

    def begin(self, stream_id: str, owner: str, attempt: int = 0, base: int = 0) -> Watch:
        self.progress()
        watch = Watch(stream_id, owner, attempt, base, base)
        self.watches = {**self.watches, stream_id: watch}
        self._beat_quietly()
        return watch

    def end(self, stream_id: str) -> None:
        self.watches = {k: w for k, w in self.watches.items() if k != stream_id}
        self.jobs += 1
        self._beat_quietly()

    def hold(self, stream_id: str, attempt: int, base: int, history: list[Event]) -> None:
        with self._held_lock:
            self._held[stream_id] = Held(stream_id, attempt, base, history, time.time())

    def held(self) -> list[str]:
        with self._held_lock:
            return list(self._held)

    def stop(self) -> None:
        self._stop_evt.set()

    def run(self) -> None:
        while not self._stop_evt.wait(self.settings.keeper_interval_s):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("Worker %s: keeper cannot reach Redis: %s", self.worker, exc)

    def tick(self) -> None:
        if self._stall():
            return
        self._check_server()
        for watch in list(self.watches.values()):
            self._renew(watch)
        self.beat()
        if reap(self.bus, self.settings, f"reaper:{self.worker}"):
            self.metrics.failovers.inc()

    def _stall(self) -> bool:
        """A stuck main loop: no renewal, no heartbeat, no reaping (said once, and again when it moves)."""
        stalled = self.stalled()
        if stalled and not self._stalled:
            log.error("Worker %s: the main loop finished no step for %.0fs; no longer renewing the leases of %s nor "
                      "the heartbeat, so that other workers take them over", self.worker,
                      time.monotonic() - self._progress_at, ", ".join(self.watches))
        elif self._stalled and not stalled:
            log.warning("Worker %s: the main loop moves again; renewing what is still ours", self.worker)
        self._stalled = stalled
        return stalled

    def _beat_quietly(self) -> None:
        """A heartbeat from the main thread: Redis may be away, and the keeper beats again anyway."""
        try:
            self.beat()
        except redis.RedisError as exc:
            log.debug("Worker %s: heartbeat failed: %s", self.worker, exc)

    def _check_server(self) -> None:
        """Expire held streams Redis has surely kept; after a restart, re-send what it did not keep."""
        server = self.bus.server_id()
        restarted = bool(self._server) and server != self._server
        now = time.time()
        with self._held_lock:
            held = self._held
            self._held = {} if restarted else {k: h for k, h in held.items() if now - h.since < DURABLE_AFTER_S}
        if restarted:
            log.warning("Worker %s: Redis restarted or failed over; checking %d streams that finished just before",
                        self.worker, len(held))
            pending = list(held.values())
            try:
                while pending:
                    self._resend(pending[0])
                    pending.pop(0)
            except redis.RedisError:  # away again: the next tick that reaches it sees the change again
                with self._held_lock:
                    self._held.update({h.stream_id: h for h in pending})
                raise
        self._server = server

    def _resend(self, h: Held) -> None:
        """Send again what Redis lost of a finished stream (its end included), if it is still ours."""
        result, last = self.bus.leases.reclaim(h.stream_id, self.worker, self.settings.lease_ttl_s, self.worker,
                                               h.attempt, h.base, h.last)
        if result is AcquireResult.FINISHED and last >= h.last:
            return
        if not result.claimed:
            log.warning("Worker %s: finished stream %s lost its end in Redis and is not ours to mend (%s)",
                        self.worker, h.stream_id, result)
            return
        log.warning("Worker %s: Redis lost events %d-%d of finished stream %s; sending them again",
                    self.worker, last + 1, h.last, h.stream_id)
        for ev in h.history[last - h.base:]:
            if self.bus.publish(h.stream_id, self.worker, ev) in (PublishResult.FENCED, PublishResult.GAP):
                return
        self.bus.leases.retire(h.stream_id)  # its terminal event is in again

    def beat(self) -> None:
        streams = list(self.watches)
        registry.heartbeat(self.bus.redis, registry.WorkerInfo(
            name=self.worker, model=self.settings.model,
            state=registry.WorkerState.BUSY if streams else registry.WorkerState.IDLE,
            stream=",".join(streams), jobs=self.jobs, started=self.started,
            host=self.host, pid=self.pid,
            metrics_port=self.metrics_port,
        ))

    def _renew(self, watch: Watch) -> None:
        renewed = self.bus.leases.renew(watch.stream_id, watch.owner, self.settings.lease_ttl_s)
        if not renewed and not self._reclaim(watch):
            watch.lost = True
            return
        r = self.bus.redis
        now = time.time()
        pipe = r.pipeline(transaction=False)
        cancel.queue_reason(pipe, watch.stream_id)
        viewers.queue_count(pipe, watch.stream_id, now)
        reason, watching = pipe.execute()
        if reason:
            watch.cancel = cancel.parse_reason(reason)
        elif watching:
            watch.no_viewer_since = now
        elif now - watch.no_viewer_since >= self.settings.abandon_grace_s:
            cancel.request(r, watch.stream_id, CancelReason.ABANDONED, self.settings.log_active_ttl_s)
            watch.cancel = CancelReason.ABANDONED

    def _reclaim(self, watch: Watch) -> bool:
        """Our lease lapsed or Redis lost it: take it back unless the stream went on without us."""
        result, last = self.bus.leases.reclaim(watch.stream_id, watch.owner, self.settings.lease_ttl_s,
                                               self.worker, watch.attempt, watch.base, watch.last)
        if result.claimed:
            log.warning("Worker %s: took back the lease of stream %s (its log ends at %d)", self.worker,
                        watch.stream_id, last)
        return result.claimed
