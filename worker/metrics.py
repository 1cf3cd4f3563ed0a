"""A worker's Prometheus metrics, on a registry of its own (one per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenfan.shared.state import JobOutcome

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400, 1000)
# A decode step: a few ms (a GPU, one stream) to a second (a prompt chunk on a busy CPU).
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
# Streams in one step's batch: every slot count up to 16 exactly, then coarser.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


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
        self.slots = Gauge("tokenfan_worker_slots", "Streams this worker can decode at once", m,
                           registry=r).labels(model)
        self.slots_busy = Gauge("tokenfan_worker_slots_busy", "Slots generating a stream now", m,
                                registry=r).labels(model)
        self.batch_size = Histogram("tokenfan_worker_batch_streams", "Streams in one decode step's batch", m,
                                    buckets=BATCH_BUCKETS, registry=r).labels(model)
        self.step_seconds = Histogram("tokenfan_worker_step_seconds", "Time of one decode step (one llama_decode)",
                                      m, buckets=STEP_BUCKETS, registry=r).labels(model)
        self.prefill_tokens = Counter("tokenfan_worker_prefill_tokens", "Prompt tokens decoded (not taken from "
                                      "a slot's prompt cache)", m, registry=r).labels(model)
        self.decode_tokens = Counter("tokenfan_worker_decode_tokens", "Generated tokens decoded", m,
                                     registry=r).labels(model)
        self.cached_tokens = Counter("tokenfan_worker_prompt_cache_tokens", "Prompt tokens taken from a slot's "
                                     "prompt cache instead of decoded", m, registry=r).labels(model)
        self.model = model

    def step(self, streams: int, prefill: int, decode: int, seconds: float) -> None:
        if streams:
            self.batch_size.observe(streams)
            self.step_seconds.observe(seconds)
        if prefill:
            self.prefill_tokens.inc(prefill)
        if decode:
            self.decode_tokens.inc(decode)

    def job(self, outcome: JobOutcome) -> None:
        self._jobs.labels(self.model, outcome).inc()
