"""What one API process makes at startup and closes at shutdown."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass, field

import anyio
import redis
import redis.asyncio as aredis

from tokenfan.api.admission import Admission
from tokenfan.api.auth import Authenticator
from tokenfan.api.hub import Hub, ShardedHub
from tokenfan.api.metrics import ApiMetrics
from tokenfan.shared import registry, viewers
from tokenfan.shared.bus import AsyncBus, BusConfig, SyncBus
from tokenfan.shared.defaults import PARSE_THREADS, VIEWER_REFRESH_S
from tokenfan.shared.reaper import reap
from tokenfan.shared.redisconn import async_client, sync_client
from tokenfan.shared.settings import ApiSettings

log = logging.getLogger(__name__)


@dataclass
class Edge:
    settings: ApiSettings
    redis: aredis.Redis
    queue_redis: aredis.Redis
    bus: AsyncBus
    sync_bus: SyncBus
    hub: Hub | ShardedHub
    metrics: ApiMetrics
    name: str
    auth: Authenticator
    admission: Admission
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    viewers: set[tuple[str, str]] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Request bodies checked at once off the event loop (api/bodies.py); made in the running loop.
    parse_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(PARSE_THREADS))

    @classmethod
    async def open(cls, settings: ApiSettings) -> Edge:
        cfg = BusConfig(settings.log_maxlen, settings.log_active_ttl_s, settings.log_ttl_s, settings.redis_cluster)
        r = async_client(settings.redis_url, cluster=settings.redis_cluster)
        sr = sync_client(settings.redis_url, cluster=settings.redis_cluster)
        qr = async_client(settings.queue_url())
        metrics = ApiMetrics()
        hub: Hub | ShardedHub
        if settings.redis_cluster:
            hub = ShardedHub(r, settings.redis_url or "", buffer=settings.subscriber_buffer,
                             on_reconnect=metrics.reconnects.inc)
        else:
            hub = Hub(r, buffer=settings.subscriber_buffer, on_reconnect=metrics.reconnects.inc)
        name = f"api:{socket.gethostname()}.{secrets.token_hex(3)}"
        sync_bus = SyncBus(sr, cfg, queue=sync_client(settings.queue_url()))
        edge = cls(settings, r, qr, AsyncBus(r, cfg), sync_bus, hub, metrics, name, Authenticator(r, settings),
                   Admission(r, qr, max_queue=settings.max_queue, slot_ttl_s=settings.log_active_ttl_s))
        await hub.start()
        edge.tasks.append(asyncio.create_task(edge._reaper(), name="tokenfan-reaper"))
        edge.tasks.append(asyncio.create_task(edge._refresh_viewers(), name="tokenfan-viewers"))
        return edge

    async def close(self) -> None:
        self.closing.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.hub.close()
        await self.redis.aclose()
        await self.queue_redis.aclose()
        self.sync_bus.redis.close()
        self.sync_bus.queue.close()

    def drain(self) -> None:
        """SIGTERM: native streams end now with `reconnect` (clients resume on
        another replica); OpenAI-format streams may finish until `end_streams`."""
        self.draining = True
        self._wake_all()

    def end_streams(self) -> None:
        self.closing.set()
        self._wake_all()

    def _wake_all(self) -> None:
        for sub in self.hub.subscriptions():
            sub.wake()

    async def _refresh_viewers(self) -> None:
        """Keep every attached viewer's entry fresh, all of them in one round trip."""
        while True:
            await asyncio.sleep(VIEWER_REFRESH_S)
            if not self.viewers:
                continue
            expiry = viewers.expiry_ms()
            pipe = self.redis.pipeline(transaction=False)
            for sid, viewer in list(self.viewers):
                viewers.queue_touch(pipe, sid, viewer, expiry)
            try:
                await pipe.execute()
            except redis.RedisError as exc:
                log.debug("API %s: viewer refresh failed: %s", self.name, exc)

    async def _reaper(self) -> None:
        """Lapsed leases end even when no worker is left to reap them."""
        while True:
            await asyncio.sleep(self.settings.keeper_interval_s)
            try:
                await asyncio.to_thread(reap, self.sync_bus, self.settings, f"reaper:{self.name}")
            except redis.RedisError as exc:
                log.debug("API %s: reaper cannot reach Redis: %s", self.name, exc)

    async def live_workers(self, model: str) -> int:
        return await registry.live_count(self.redis, model)

    async def models(self) -> list[str]:
        """Configured models, then any model a live worker serves."""
        found = list(self.settings.served_models())
        return found + [m for m in await registry.live_models(self.redis) if m not in found]
