"""Running the API under uvicorn: uvloop, httptools, no access log per request.

The HTTP protocol is uvicorn's httptools one with our bounds on a client's
request head and on the times to receive it and the body (ops/protocol.py):
the API holds against a hostile client without a proxy in front, not only
behind one."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket

import uvicorn
from fastapi import FastAPI

from tokenfan.api.app import create_app
from tokenfan.ops.protocol import Limits, guarded
from tokenfan.shared.redisconn import require_url
from tokenfan.shared.settings import ApiSettings

log = logging.getLogger(__name__)

# Connections a single API process accepts before answering 503: bounds memory
# under a flood of idle clients (see docs/security.md).
LIMIT_CONCURRENCY = 10_000
# Seconds an idle keep-alive connection stays open.
KEEPALIVE_S = 75
GC_GEN0_THRESHOLD = 50_000


class _Server(uvicorn.Server):
    """uvicorn, plus tokenfan's drain: native streams are told to reconnect at
    once; OpenAI-format streams get until just before uvicorn's own deadline."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        edge = getattr(self.app.state, "edge", None)
        if edge is not None:
            log.info("API %s: draining open streams", edge.name)
            edge.drain()
            asyncio.get_running_loop().call_later(max(0.0, self.grace_s - 1.0), edge.end_streams)
        await super().shutdown(sockets)


def serve_api(settings: ApiSettings) -> int:
    require_url(settings.redis_url)  # fail with one clear line, not a startup traceback
    # Thousands of long-lived streams make many small objects: full collections
    # paused the API 140-220 ms with 1,000 streams open (benchmark). Collect
    # young objects less often and freeze what startup made.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded(Limits(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s)),
        access_log=False,
        log_level="warning",
        timeout_keep_alive=KEEPALIVE_S,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        limit_concurrency=LIMIT_CONCURRENCY,
        lifespan="on",
    )
    log.info("API listening on http://%s:%d", settings.host, settings.port)
    _Server(config, app, settings.shutdown_grace_s).run()
    return 0
