"""Running the API under uvicorn: uvloop, httptools, no access log per request."""

from __future__ import annotations

import logging

import uvicorn

from tokenfan.api.app import create_app
from tokenfan.shared.settings import Settings

log = logging.getLogger(__name__)

# Connections a single API process accepts before answering 503: bounds memory
# under a flood of idle clients (see docs/security.md).
LIMIT_CONCURRENCY = 10_000
# Seconds an idle keep-alive connection stays open.
KEEPALIVE_S = 75


def serve_api(settings: Settings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=KEEPALIVE_S,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        limit_concurrency=LIMIT_CONCURRENCY,
        lifespan="on",
    )
    log.info("API listening on http://%s:%d", settings.host, settings.port)
    uvicorn.Server(config).run()
    return 0
