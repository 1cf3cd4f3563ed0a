"""The keeper: a worker's background thread for everything that must go on
while the model holds the main thread (prefill can take seconds).

About once a second it heartbeats the worker's registry entry, renews the
lease of every stream its slots are generating, notices a cancel flag or a
stream with no viewer left (and flags it abandoned), and reaps lapsed leases
of other workers. The main thread's loop sees what it learnt between decode
steps (each stream's `Watch`); no lock is needed, since each field has one
writer and the set of watches is replaced, never changed in place.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import redis

from tokenfan.shared import keys, registry
from tokenfan.shared.bus import SyncBus
from tokenfan.shared.reaper import reap
from tokenfan.shared.settings import WorkerSettings
from tokenfan.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass
class Watch:
    """A stream being generated, and what the keeper learnt about it."""

    stream_id: str
    owner: str
    cancel: str = ""
    lost: bool = False
    no_viewer_since: float = field(default_factory=time.time)


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

    def begin(self, stream_id: str, owner: str) -> Watch:
        watch = Watch(stream_id, owner)
        self.watches = {**self.watches, stream_id: watch}
        self.bus.set_deadline(stream_id, self.settings.lease_ttl_s)
        self.beat()
        return watch

    def end(self, stream_id: str) -> None:
        self.watches = {k: w for k, w in self.watches.items() if k != stream_id}
        self.jobs += 1
        self.beat()

    def stop(self) -> None:
        self._stop_evt.set()

    def run(self) -> None:
        while not self._stop_evt.wait(self.settings.keeper_interval_s):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("Worker %s: keeper cannot reach Redis: %s", self.worker, exc)

    def tick(self) -> None:
        for watch in list(self.watches.values()):
            self._renew(watch)
        self.beat()
        if reap(self.bus, self.settings, f"reaper:{self.worker}"):
            self.metrics.failovers.inc()

    def beat(self) -> None:
        streams = list(self.watches)
        registry.heartbeat(self.bus.redis, registry.WorkerInfo(
            name=self.worker, model=self.settings.model,
            state=registry.WorkerState.BUSY if streams else registry.WorkerState.IDLE,
            stream=",".join(streams), jobs=self.jobs, started=self.started,
            host=self.host, pid=self.pid,
            metrics_port=self.settings.metrics_port,
        ))

    def _renew(self, watch: Watch) -> None:
        if not self.bus.renew(watch.stream_id, watch.owner, self.settings.lease_ttl_s):
            watch.lost = True
            return
        r = self.bus.redis
        now = time.time()
        pipe = r.pipeline(transaction=False)
        pipe.get(keys.cancel(watch.stream_id))
        pipe.zcount(keys.viewers(watch.stream_id), int(now * 1000), "+inf")
        reason, viewers = pipe.execute()
        if reason:
            watch.cancel = reason.decode()
        elif viewers:
            watch.no_viewer_since = now
        elif now - watch.no_viewer_since >= self.settings.abandon_grace_s:
            r.set(keys.cancel(watch.stream_id), "abandoned", nx=True, ex=self.settings.log_active_ttl_s)
            watch.cancel = "abandoned"
