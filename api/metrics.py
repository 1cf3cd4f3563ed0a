"""The API process's Prometheus metrics, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("tokenfan_api_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.active = Gauge("tokenfan_api_active_streams", "Responses streaming now", registry=r)
        self.resumes = Counter("tokenfan_api_resumes", "Stream reads that resumed after an event id", registry=r)
        self.disconnects = Counter("tokenfan_api_disconnects", "Clients gone before the terminal event",
                                   registry=r)
        self.first_token = Histogram("tokenfan_api_first_token_seconds", "Request received to first token written",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.relay_lag = Histogram("tokenfan_api_relay_lag_seconds", "Worker publish to API write of an event",
                                   buckets=LAG_BUCKETS, registry=r)
        self.relayed = Counter("tokenfan_api_events_relayed", "Events written to clients", registry=r)
        self.reconnects = Counter("tokenfan_api_pubsub_reconnects", "Reconnects of the shared pub/sub connection",
                                  registry=r)
        self.queue_depth = Gauge("tokenfan_queue_depth", "Jobs waiting per model", ["model"], registry=r)
        self.workers_live = Gauge("tokenfan_workers_live", "Live workers per model", ["model"], registry=r)
