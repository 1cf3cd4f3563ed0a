"""The FastAPI application: its lifespan, middleware, error handlers and one router per surface
(api/routers/)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from tokenfan.api import discovery, ops
from tokenfan.api.auth import DocsGate
from tokenfan.api.edge import Edge
from tokenfan.api.errors import add_handlers
from tokenfan.api.middleware import BodyLimit, RequestMetrics
from tokenfan.api.openapi import openapi_without_422
from tokenfan.api.requestid import RequestIds
from tokenfan.api.routers import ROUTERS
from tokenfan.api.routers.ops import STATIC
from tokenfan.shared.redisconn import redacted
from tokenfan.shared.settings import ApiSettings

log = logging.getLogger(__name__)


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        edge = await Edge.open(settings)
        app.state.edge = edge
        edge.tasks.append(asyncio.create_task(discovery.announce(edge), name="tokenfan-discovery"))
        edge.tasks.append(asyncio.create_task(ops.record(edge), name="tokenfan-ops-history"))
        if not await edge.auth.enabled():
            log.warning("API %s: NO API KEYS ARE CONFIGURED - this API is open to anyone who can reach it. "
                        "Add keys (tokenfan keys add) before exposing it beyond this machine.", edge.name)
        log.info("API %s: serving %s, Redis at %s", edge.name, ", ".join(settings.served_models()),
                 redacted(settings.redis_url))
        try:
            yield
        finally:
            await edge.close()

    app = FastAPI(title="tokenfan", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(DocsGate, public=settings.public_docs)
    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestIds)
    add_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = openapi_without_422(app)  # type: ignore[method-assign]
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
