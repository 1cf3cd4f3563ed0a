"""Which workers are alive, which model each serves: heartbeats in Redis."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis

from tokenfan.shared import keys
from tokenfan.shared.defaults import WORKER_LIVE_S

# Heartbeats older than this are pruned from a model's set.
PRUNE_AFTER_S = 300


def heartbeat(redis: Redis, name: str, model: str, fields: dict[str, Any]) -> None:
    now_ms = int(time.time() * 1000)
    pipe = redis.pipeline(transaction=False)
    pipe.hset(keys.worker(name), mapping={**fields, "model": model, "last_seen": now_ms / 1000})
    pipe.expire(keys.worker(name), int(WORKER_LIVE_S * 3))
    pipe.zadd(keys.workers(model), {name: now_ms})
    pipe.zremrangebyscore(keys.workers(model), 0, now_ms - PRUNE_AFTER_S * 1000)
    pipe.execute()


def deregister(redis: Redis, name: str, model: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(keys.workers(model), name)
    pipe.delete(keys.worker(name))
    pipe.execute()


def live_workers(redis: Redis, model: str) -> list[str]:
    since = int((time.time() - WORKER_LIVE_S) * 1000)
    return [n.decode() for n in redis.zrangebyscore(keys.workers(model), since, "+inf")]
