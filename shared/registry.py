"""Which workers are alive, which model each serves: heartbeats in Redis.

Each worker keeps a small hash (`keys.worker(name)`, a `WorkerInfo`) and a
score in its model's set (`keys.workers(model)`, name -> last heartbeat ms).
A worker is live while that score is younger than `WORKER_LIVE_S`; this
module is the one place that asks, for the reapers (sync) and the API
(asyncio) alike. Whoever asks (and every heartbeat) first drops the names
whose heartbeat is older than that, in the same round trip: a SIGKILLed
worker leaves the set within one liveness window, even when it was the
model's only worker and nobody else heartbeats there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from tokenfan.shared import keys
from tokenfan.shared.defaults import WORKER_LIVE_S, WORKER_RECORD_TTL_S

# SCAN's per-call hint for the models' worker sets: there are a handful of models.
SCAN_COUNT = 100
# A starting worker looks this often whether a namesake's heartbeat moves (a second's keeper interval).
NAMESAKE_POLL_S = 0.2


class WorkerState(StrEnum):
    BUSY = "busy"  # generating a stream
    IDLE = "idle"
    UNKNOWN = "unknown"  # a record without a state (an older worker, or half-expired)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker's heartbeat record."""

    name: str
    model: str
    state: WorkerState = WorkerState.UNKNOWN
    stream: str = ""
    jobs: int = 0
    started: float = 0.0
    host: str = ""
    pid: int = 0
    last_seen: float = 0.0
    metrics_port: int = 0  # where Prometheus scrapes it (0: no metrics); api/discovery.py lists it

    def to_hash(self, now: float) -> dict[str, str | int | float]:
        return {"model": self.model, "state": self.state.value, "stream": self.stream, "jobs": self.jobs,
                "started": self.started, "host": self.host, "pid": self.pid, "last_seen": now,
                "metrics_port": self.metrics_port}

    @classmethod
    def parse(cls, name: str, raw: Mapping[bytes, bytes]) -> WorkerInfo:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(name=name, model=h.get("model", ""), state=_state(h.get("state", "")),
                   stream=h.get("stream", ""), jobs=int(h.get("jobs") or 0), started=float(h.get("started") or 0),
                   host=h.get("host", ""), pid=int(h.get("pid") or 0), last_seen=float(h.get("last_seen") or 0),
                   metrics_port=int(h.get("metrics_port") or 0))

    def as_json(self) -> dict[str, Any]:
        """The ops page's view of the worker."""
        return {"name": self.name, "model": self.model, "state": self.state.value, "stream": self.stream,
                "host": self.host, "pid": self.pid, "jobs": self.jobs, "last_seen": self.last_seen,
                "metrics_port": self.metrics_port}


def _state(raw: str) -> WorkerState:
    try:
        return WorkerState(raw)
    except ValueError:
        return WorkerState.UNKNOWN


def heartbeat(redis: Redis, info: WorkerInfo) -> None:
    now = time.time()
    now_ms = int(now * 1000)
    pipe = redis.pipeline(transaction=False)
    pipe.hset(keys.worker(info.name), mapping=info.to_hash(now))
    pipe.expire(keys.worker(info.name), WORKER_RECORD_TTL_S)
    pipe.zadd(keys.workers(info.model), {info.name: now_ms})
    _prune(pipe, info.model, _live_since())
    pipe.execute()


def deregister(redis: Redis, name: str, model: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(keys.workers(model), name)
    pipe.delete(keys.worker(name))
    pipe.execute()


def _live_since() -> int:
    """The oldest heartbeat (ms) that still counts as live."""
    return int((time.time() - WORKER_LIVE_S) * 1000)


def _prune(pipe: Any, model: str, since: int) -> None:
    """Queue the removal of every name older than `since` (sync or asyncio pipeline: both buffer)."""
    pipe.zremrangebyscore(keys.workers(model), "-inf", f"({since}")


def live_workers(redis: Redis, model: str) -> list[str]:
    since = _live_since()
    pipe = redis.pipeline(transaction=False)
    _prune(pipe, model, since)
    pipe.zrangebyscore(keys.workers(model), since, "+inf")
    return [n.decode() for n in pipe.execute()[-1]]


async def live_workers_async(redis: AsyncRedis, model: str) -> list[str]:
    since = _live_since()
    pipe = redis.pipeline(transaction=False)
    _prune(pipe, model, since)
    pipe.zrangebyscore(keys.workers(model), since, "+inf")
    return [n.decode() for n in (await pipe.execute())[-1]]


def live_namesake(redis: Redis, name: str, poll_s: float = NAMESAKE_POLL_S) -> WorkerInfo | None:
    """The live worker already heartbeating under `name`, or None: a predecessor that stopped
    without deregistering (SIGKILL, an OOM kill, a container restarted in place) beats no more.
    A record younger than `WORKER_LIVE_S` is watched until it either beats again (live) or ages
    past that (dead): at most one liveness window."""
    first = WorkerInfo.parse(name, redis.hgetall(keys.worker(name)))
    while first.last_seen and time.time() - first.last_seen < WORKER_LIVE_S:
        time.sleep(poll_s)
        now = WorkerInfo.parse(name, redis.hgetall(keys.worker(name)))
        if now.last_seen != first.last_seen:
            return now
    return None


async def worker_info(redis: AsyncRedis, name: str) -> WorkerInfo:
    return WorkerInfo.parse(name, await redis.hgetall(keys.worker(name)))


async def live_count(redis: AsyncRedis, model: str) -> int:
    since = _live_since()
    pipe = redis.pipeline(transaction=False)
    _prune(pipe, model, since)
    pipe.zcount(keys.workers(model), since, "+inf")
    return int((await pipe.execute())[-1])


async def live_models(redis: AsyncRedis) -> list[str]:
    """Every model at least one live worker serves."""
    found = []
    async for key in redis.scan_iter(match=keys.workers("*"), count=SCAN_COUNT):
        model = key.decode().removeprefix(keys.workers(""))
        if await live_count(redis, model):
            found.append(model)
    return found
