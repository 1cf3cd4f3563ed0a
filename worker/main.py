"""`tokenfan worker`: load the model once, then serve a model's queue, `slots` streams at once.

RQ's default worker forks a child per job, which would reload the model
each time and must never touch an initialised GPU context after fork, and
`SimpleWorker` runs one job at a time; the scheduler (worker/scheduler.py)
drives an RQ `SimpleWorker`'s bookkeeping for up to `slots` jobs in one
batch. We own what RQ lacks: heartbeats and leases during a job (the
keeper) and a shutdown that hands long streams back instead of cutting them.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import time

import redis
from prometheus_client import start_http_server
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from tokenfan.shared import registry
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.shared.defaults import WORKER_LIVE_S, WORKER_METRICS_PORT_SPAN
from tokenfan.shared.errors import ConfigError
from tokenfan.shared.jobs import queue
from tokenfan.shared.redisconn import last_tries, redacted, sync_client
from tokenfan.shared.settings import FakeEngineSettings, WorkerSettings
from tokenfan.worker.engines import load_engine
from tokenfan.worker.keeper import Keeper
from tokenfan.worker.metrics import WorkerMetrics
from tokenfan.worker.runner import Runner
from tokenfan.worker.scheduler import Scheduler

log = logging.getLogger(__name__)

# How long a stopping worker waits for its keeper's last tick.
KEEPER_JOIN_S = 5.0
MAX_PORT = 65535


def worker_name(settings: WorkerSettings) -> str:
    return settings.worker_name or f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"


def bus_config(settings: WorkerSettings) -> BusConfig:
    return BusConfig(settings.log_maxlen, settings.log_active_ttl_s, settings.log_ttl_s, settings.redis_cluster)


def start_metrics(settings: WorkerSettings, metrics: WorkerMetrics) -> int:
    """Start the exporter; the port it listens on (0: off).

    The default port is where a worker starts looking: several workers on one host (one per GPU)
    take the next free ones, and each records its own in the registry, where Prometheus'
    service discovery (/metrics/targets) and the ops page find it. A port the operator named is
    taken as is, or the worker stops with one line naming the setting: something scrapes exactly
    that port (a PodMonitor, an EXPOSE, a static config), and moving quietly would hide it from it.
    """
    if not settings.metrics_port:
        return 0
    if not 0 < settings.metrics_port <= MAX_PORT:
        raise ConfigError(f"TOKENFAN_METRICS_PORT: {settings.metrics_port} is not a port (1-{MAX_PORT}, or 0 to "
                          "turn the exporter off)", param="metrics_port")
    named = "metrics_port" in settings.model_fields_set
    span = 1 if named else min(WORKER_METRICS_PORT_SPAN, MAX_PORT + 1 - settings.metrics_port)
    for port in range(settings.metrics_port, settings.metrics_port + span):
        try:
            start_http_server(port, registry=metrics.registry)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or named:
                raise ConfigError(f"TOKENFAN_METRICS_PORT: cannot listen on port {port} ({exc.strerror}); "
                                  "give each worker on a host its own port, or 0 to turn the exporter off",
                                  param="metrics_port") from exc
            continue
        if port != settings.metrics_port:
            log.info("Worker metrics: port %d is taken (another worker on this host?); listening on %d",
                     settings.metrics_port, port)
        return port
    last = settings.metrics_port + span - 1
    raise ConfigError(f"TOKENFAN_METRICS_PORT: ports {settings.metrics_port}-{last} are all taken; set a free "
                      "port, or 0 to turn the exporter off", param="metrics_port")


def check_settings(settings: WorkerSettings) -> None:
    """What the fields' types cannot say: a worker that could never take a job, or whose leases lapse
    between two renewals, is a configuration mistake, said in one line before anything starts."""
    if settings.slots < 1:
        raise ConfigError(f"TOKENFAN_SLOTS: {settings.slots}; a worker needs at least one slot", param="slots")
    if settings.keeper_interval_s <= 0:
        raise ConfigError("TOKENFAN_KEEPER_INTERVAL_S: must be more than 0 seconds", param="keeper_interval_s")
    if settings.lease_ttl_s <= settings.keeper_interval_s:
        raise ConfigError(f"TOKENFAN_LEASE_TTL_S: {settings.lease_ttl_s:g}s would lapse before its renewal every "
                          f"{settings.keeper_interval_s:g}s (TOKENFAN_KEEPER_INTERVAL_S); make it several times "
                          "longer", param="lease_ttl_s")


def clear_predecessor(bus: SyncBus, worker: SimpleWorker) -> None:
    """Start under a name a dead worker left registered (Kubernetes restarts a container in place
    under its pod's name): RQ refuses a name whose worker key lives (8 to 30 minutes after a kill),
    so a predecessor that no longer heartbeats in our registry is marked dead in RQ's; its streams
    are the reapers' as any dead worker's. A live one under the same name is a configuration mistake."""
    live = registry.live_namesake(bus.redis, worker.name)
    if live is not None:
        raise ConfigError(f"TOKENFAN_WORKER_NAME: a live worker named {worker.name!r} already runs (host "
                          f"{live.host or '?'}, pid {live.pid}); give each worker its own name",
                          param="worker_name")
    prior = SimpleWorker.find_by_key(worker.key, connection=worker.connection, serializer=JSONSerializer)
    if prior is not None and prior.death_date is None:
        prior.register_death()
        log.warning("Worker %s: a worker of this name stopped without deregistering (killed?); cleared its RQ "
                    "registration", worker.name)


def run_worker(settings: WorkerSettings, fake: FakeEngineSettings | None = None) -> int:
    check_settings(settings)
    name = worker_name(settings)
    metrics = WorkerMetrics(settings.model)
    metrics_port = start_metrics(settings, metrics)
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
    keeper.metrics_port = metrics_port
    runner = Runner(settings, engine, bus, keeper, metrics, name)
    q = queue(rq_redis, settings.model)
    worker = SimpleWorker([q], connection=rq_redis, serializer=JSONSerializer, name=name)
    clear_predecessor(bus, worker)
    keeper.beat()
    keeper.start()
    try:
        Scheduler(runner, worker, q).run()
    finally:
        engine.close()
        keeper.stop()
        last_tries(bus.redis, bus.queue)  # a keeper tick retrying through a Redis outage would hold up the stop
        keeper.join(KEEPER_JOIN_S)  # its last heartbeat must not land after the deregistration
        try:
            registry.deregister(bus.redis, name, settings.model)
        except redis.RedisError as exc:
            log.warning("Worker %s: could not deregister (%s); it stops counting as live %gs after its last "
                        "heartbeat", name, exc, WORKER_LIVE_S)
        log.info("Worker %s: stopped", name)
    return 0
