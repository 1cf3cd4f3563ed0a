"""A worker's Prometheus metrics, on a registry of its own (one per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400, 1000)


class WorkerMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, ["model"]
        self.queue_wait = Histogram("tokenfan_worker_queue_wait_seconds", "Enqueue to job start", m,
                                    buckets=LATENCY_BUCKETS, registry=r).labels(model)
        self.ttft = Histogram("tokenfan_worker_ttft_seconds", "Job start to the model's first token", m,
                              buckets=LATENCY_BUCKETS, registry=r).labels(model)
        self.tokens = Counter("tokenfan_worker_tokens_generated", "Tokens generated", m, registry=r).labels(model)
        self.tps = Histogram("tokenfan_worker_tokens_per_second", "Tokens per second of each job", m,
                             buckets=RATE_BUCKETS, registry=r).labels(model)
        self._jobs = Counter("tokenfan_worker_jobs", "Jobs by outcome", ["model", "outcome"], registry=r)
        self.model_load = Gauge("tokenfan_worker_model_load_seconds", "Time the model took to load", m,
                                registry=r).labels(model)
        self.busy = Gauge("tokenfan_worker_busy", "1 while generating, 0 while idle", m, registry=r).labels(model)
        self.failovers = Counter("tokenfan_worker_failovers", "Lapsed streams this worker reaped", m,
                                 registry=r).labels(model)
        self.model = model

    def job(self, outcome: str) -> None:
        self._jobs.labels(self.model, outcome).inc()
