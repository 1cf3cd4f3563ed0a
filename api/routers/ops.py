"""The operator's surface: health and readiness probes, Prometheus' metrics and targets, the chat
page, and the ops page with its snapshot, history and live feed (api/ops.py, api/discovery.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import orjson
import redis
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenfan.api import discovery, ops, sse
from tokenfan.api.bodies import CheckedBodyRoute
from tokenfan.api.deps import edge_of
from tokenfan.api.edge import Edge
from tokenfan.api.openapi import COMMON_ERRORS, described_errors, errors_doc
from tokenfan.shared import keys
from tokenfan.shared.defaults import OPS_FEED_INTERVAL_S, OPS_HISTORY_S
from tokenfan.shared.errors import NotFound, TokenfanError

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent.parent / "static"

router = APIRouter(route_class=CheckedBodyRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses={503: {"description": "not ready, with the reason"}})
async def readyz(request: Request) -> JSONResponse:
    edge = edge_of(request)
    try:
        await edge.redis.ping()
    except redis.RedisError as exc:
        # The reason names no address (anyone may ask: probes carry no key); the admin key sees why.
        body = {"status": "unready", "reason": "Redis unreachable"}
        if await _admin_asks(edge, request):
            body["detail"] = str(exc)
        return JSONResponse(body, status_code=503)
    missing = [m for m in edge.settings.served_models() if not await edge.live_workers(m)]
    if missing:
        return JSONResponse({"status": "unready", "reason": f"no live worker for: {', '.join(missing)}"},
                            status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                                    **errors_doc(*COMMON_ERRORS)})
async def metrics(request: Request) -> Response:
    edge = edge_of(request)
    if await edge.auth.enabled():
        await edge.auth.metrics_allowed(request)
    try:
        await ops.refresh_gauges(edge)
    except redis.RedisError as exc:
        log.debug("API %s: queue gauges not refreshed: %s", edge.name, exc)
    return Response(generate_latest(edge.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False, response_model=None)
async def index() -> Response:
    page = STATIC / "index.html"
    if not page.is_file():
        raise NotFound("the chat page is not installed")
    return FileResponse(page)


async def _admin_asks(edge: Edge, request: Request) -> bool:
    """Whether the request carries an admin key this process can check (Redis may be down)."""
    try:
        return (await edge.auth.admin(request)).admin
    except (TokenfanError, redis.RedisError):
        return False


@router.get("/ops", include_in_schema=False, response_model=None)
async def ops_page() -> Response:
    return FileResponse(STATIC / "ops.html")


@router.get("/v1/ops/snapshot", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                                           **described_errors(*COMMON_ERRORS)})
async def ops_snapshot(request: Request) -> Response:
    await edge_of(request).auth.admin(request)
    return Response(orjson.dumps(await ops.snapshot(edge_of(request))), media_type="application/json")


@router.get("/v1/ops/history", include_in_schema=False)
async def ops_history(request: Request) -> Response:
    """The charts' last 15 minutes; the feed's `snapshot` events carry each new sample."""
    edge = edge_of(request)
    await edge.auth.admin(request)
    raw = await edge.redis.lrange(keys.ops_history(), 0, -1)
    samples = b",".join(reversed(raw))  # stored as JSON, newest first
    body = b'{"interval_s":%s,"span_s":%s,"samples":[%s]}' % (
        orjson.dumps(OPS_FEED_INTERVAL_S), orjson.dumps(OPS_HISTORY_S), samples)
    return Response(body, media_type="application/json")


@router.get("/v1/ops/events", response_model=None, include_in_schema=False)
async def ops_events(request: Request) -> sse.SSEResponse:
    edge = edge_of(request)
    await edge.auth.admin(request)
    stop = anyio.Event()
    return sse.SSEResponse(ops.feed(edge, stop), ping_s=edge.settings.heartbeat_s,
                           send_timeout_s=edge.settings.send_timeout_s, grace_s=OPS_FEED_INTERVAL_S,
                           shutdown_event=stop)


@router.get(discovery.PATH, responses={200: {"content": {"application/json": {"schema": {"type": "array"}}}},
                                       **described_errors(400, *COMMON_ERRORS)})
async def metrics_targets(request: Request, role: str | None = None) -> Response:
    edge = edge_of(request)
    if await edge.auth.enabled():
        await edge.auth.metrics_allowed(request)
    return Response(orjson.dumps(await discovery.targets(edge, role)), media_type="application/json")
