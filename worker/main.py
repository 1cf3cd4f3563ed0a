"""`tokenfan worker`: load the model once, then serve a model's queue, `slots` streams at once.

RQ's default worker forks a child per job, which would reload the model
each time and must never touch an initialised GPU context after fork, and
`SimpleWorker` runs one job at a time; the scheduler (worker/scheduler.py)
drives an RQ `SimpleWorker`'s bookkeeping for up to `slots` jobs in one
batch. We own what RQ lacks: heartbeats and leases during a job (the
keeper) and a shutdown that hands long streams back instead of cutting them.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

from prometheus_client import start_http_server
from rq import SimpleWorker
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
from tokenfan.worker.scheduler import Scheduler

log = logging.getLogger(__name__)

# How long a stopping worker waits for its keeper's last tick.
KEEPER_JOIN_S = 5.0


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
    q = queue(rq_redis, settings.model)
    worker = SimpleWorker([q], connection=rq_redis, serializer=JSONSerializer, name=name)
    try:
        Scheduler(runner, worker, q).run()
    finally:
        engine.close()
        keeper.stop()
        keeper.join(KEEPER_JOIN_S)  # its last heartbeat must not land after the deregistration
        registry.deregister(bus.redis, name, settings.model)
        log.info("Worker %s: stopped", name)
    return 0
