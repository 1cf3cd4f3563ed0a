"""Prometheus service discovery: `/metrics/targets` lists every live API
process and worker in Prometheus' HTTP SD format, so scaling either tier
needs no edit of prometheus.yml (ops/prometheus/prometheus.yml.template
points `http_sd_configs` here).

Workers are the registry's live workers (shared/registry.py) that record a
metrics port; API processes announce themselves here, every
`API_ANNOUNCE_S`, in one Redis hash, and count while the announcement is
younger than `API_LIVE_S`. Any replica answers for all of them: Redis is
the only place they meet. The route is restricted like `/metrics` (open
without keys, else an allowed network or an admin key), and nginx keeps
both private.

Departures from the obvious:
- The address a process announces is the host name it runs on, as the
  worker registry's `host` is, unless the API listens on one specific
  address: a container's host name is what its peers resolve.
- Only `__meta_tokenfan_*` labels: Prometheus drops them after relabelling
  unless asked, so no scraped series gets a label it does not expect
  (a `model` target label would rename the workers' own `model`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis

from tokenfan.shared import keys, registry
from tokenfan.shared.defaults import API_ANNOUNCE_S, API_LIVE_S
from tokenfan.shared.errors import InvalidRequest

if TYPE_CHECKING:
    from tokenfan.api.edge import Edge

log = logging.getLogger(__name__)

ROLES = ("api", "worker")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
PATH = "/metrics/targets"


async def targets(edge: Edge, role: str | None) -> list[dict[str, Any]]:
    """Every live process of `role` (None: both) as Prometheus' HTTP SD target groups."""
    if role is not None and role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", code="invalid_value", param="role")
    wanted = ROLES if role is None else (role,)
    return [g for r in wanted for g in await (_apis(edge) if r == "api" else _workers(edge))]


def address(edge: Edge) -> str:
    host = edge.settings.host
    return f"{socket.gethostname() if host in WILDCARD_HOSTS else host}:{edge.settings.port}"


async def announce(edge: Edge) -> None:
    """The API process's own entry, until it stops (a lifespan task; Edge.close cancels it)."""
    entry = {"address": address(edge)}
    while True:
        try:
            await edge.redis.hset(keys.api_processes(), edge.name, orjson.dumps({**entry, "seen": time.time()}))
        except redis.RedisError as exc:
            log.debug("API %s: service discovery announce failed: %s", edge.name, exc)
        await asyncio.sleep(API_ANNOUNCE_S)


def _group(target: str, role: str, name: str, model: str = "") -> dict[str, Any]:
    labels = {"__meta_tokenfan_role": role, "__meta_tokenfan_name": name}
    if model:
        labels["__meta_tokenfan_model"] = model
    return {"targets": [target], "labels": labels}


async def _apis(edge: Edge) -> list[dict[str, Any]]:
    now = time.time()
    groups, gone = [], []
    for raw_name, raw in (await edge.redis.hgetall(keys.api_processes())).items():
        name, entry = raw_name.decode(), orjson.loads(raw)
        if now - float(entry.get("seen", 0)) > API_LIVE_S:
            gone.append(name)
        else:
            groups.append(_group(str(entry["address"]), "api", name))
    if gone:  # stopped or crashed processes leave; a live one re-announces within API_ANNOUNCE_S anyway
        await edge.redis.hdel(keys.api_processes(), *gone)
    return sorted(groups, key=lambda g: str(g["targets"]))


async def _workers(edge: Edge) -> list[dict[str, Any]]:
    groups = []
    for model in await registry.live_models(edge.redis):
        for name in await registry.live_workers_async(edge.redis, model):
            info = await registry.worker_info(edge.redis, name)
            if info.metrics_port and info.host:
                groups.append(_group(f"{info.host}:{info.metrics_port}", "worker", name, model))
    return groups
