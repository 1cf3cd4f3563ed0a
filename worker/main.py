"""`tokenfan worker`: load the model once, then serve a model's queue.

RQ's default worker forks a child per job, which would reload the model
each time and must never touch an initialised GPU context after fork; we
use `SimpleWorker` (jobs run in this process) and own what it lacks:
heartbeats and leases during a job (the keeper) and a shutdown that hands
a long stream back instead of cutting it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from types import FrameType
from typing import Any

from prometheus_client import start_http_server
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer

from tokenfan.shared import registry
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.errors import ConfigError
from tokenfan.shared.jobs import queue
from tokenfan.shared.redisconn import redacted, sync_client
from tokenfan.shared.settings import FakeEngineSettings, WorkerSettings
from tokenfan.worker.engines import load_engine
from tokenfan.worker.keeper import Keeper
from tokenfan.worker.metrics import WorkerMetrics
from tokenfan.worker.runner import Runner

log = logging.getLogger(__name__)

# How long a stopping worker waits for its keeper's last tick.
KEEPER_JOIN_S = 5.0


class TokenfanWorker(SimpleWorker):  # type: ignore[misc]
    """An RQ SimpleWorker that binds the tokenfan runner around every job."""

    def __init__(self, *args: Any, runner: Runner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner

    def execute_job(self, job: Job, queue: Queue) -> None:
        with self.runner.bound():
            super().execute_job(job, queue)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        # Remember when the deploy asked us to go: the runner hands the stream
        # back once finishing it would take longer than the grace period.
        if not self.runner.shutdown_at:
            self.runner.shutdown_at = time.time()
            log.warning("Worker %s: stop requested; taking no new job", self.runner.name)
        super().request_stop(signum, frame)


def worker_name(settings: WorkerSettings) -> str:
    return settings.worker_name or f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"


def bus_config(settings: WorkerSettings) -> BusConfig:
    return BusConfig(settings.log_maxlen, settings.log_active_ttl_s, settings.log_ttl_s, settings.redis_cluster)


def start_metrics(settings: WorkerSettings, metrics: WorkerMetrics) -> None:
    if not settings.metrics_port:
        return
    try:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    except OSError as exc:  # most often a second worker on this host with the same port
        raise ConfigError(f"TOKENFAN_METRICS_PORT: cannot listen on port {settings.metrics_port} ({exc.strerror}); "
                          "give each worker on a host its own port, or 0 to turn the exporter off",
                          param="metrics_port") from exc


def run_worker(settings: WorkerSettings, fake: FakeEngineSettings | None = None) -> int:
    name = worker_name(settings)
    metrics = WorkerMetrics(settings.model)
    start_metrics(settings, metrics)
    t0 = time.perf_counter()
    engine = load_engine(settings, fake)
    metrics.model_load.set(time.perf_counter() - t0)
    log.info("Worker %s: %s engine ready in %.2fs; serving model %s from %s", name, engine.name,
             time.perf_counter() - t0, settings.model, redacted(settings.redis_url))
    # RQ blocks in BLPOP for minutes: its connection must have no socket timeout.
    rq_redis = sync_client(settings.queue_url(), socket_timeout=None)
    bus = SyncBus(sync_client(settings.redis_url, cluster=settings.redis_cluster), bus_config(settings),
                  queue=sync_client(settings.queue_url()))
    keeper = Keeper(bus, settings, name, metrics)
    runner = Runner(settings, engine, bus, keeper, metrics, name)
    keeper.beat()
    keeper.start()
    worker = TokenfanWorker(
        [queue(rq_redis, settings.model)], connection=rq_redis, serializer=JSONSerializer, name=name, runner=runner
    )
    try:
        worker.work(with_scheduler=False, logging_level="WARNING")
    finally:
        keeper.stop()
        keeper.join(KEEPER_JOIN_S)  # its last heartbeat must not land after the deregistration
        registry.deregister(bus.redis, name, settings.model)
        log.info("Worker %s: stopped", name)
    return 0
