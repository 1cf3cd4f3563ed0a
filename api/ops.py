"""The ops view: one snapshot of models, queues, workers, streams and errors,
served as JSON, as a live SSE feed, and as the static page `/ops`.

The feed is an sse-starlette response like the streams (api/sse.py), but it
has nothing to hand over at shutdown: it ends as soon as the library sees
the server stopping (its `shutdown_event`), and the page's EventSource
reconnects to another replica.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import redis
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response

from tokenfan.api import sse
from tokenfan.shared import keys, registry
from tokenfan.shared.defaults import ERRORS_SHOWN, OPS_FEED_INTERVAL_S, OPS_MAX_STREAMS
from tokenfan.shared.state import StreamState, StreamStatus

if TYPE_CHECKING:
    from tokenfan.api.edge import Edge

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    @app.get("/ops", include_in_schema=False, response_model=None)
    async def ops_page() -> Response:
        return FileResponse(STATIC / "ops.html")

    errors: dict[int | str, dict[str, Any]] = {s: {"description": "error, OpenAI's shape"} for s in (401, 403, 503)}

    @app.get("/v1/ops/snapshot", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                                            **errors})
    async def ops_snapshot(request: Request) -> Response:
        await request.app.state.edge.auth.admin(request)
        return Response(orjson.dumps(await snapshot(request.app.state.edge)), media_type="application/json")

    @app.get("/v1/ops/events", response_model=None, include_in_schema=False)
    async def ops_events(request: Request) -> sse.SSEResponse:
        edge: Edge = request.app.state.edge
        await edge.auth.admin(request)
        stop = anyio.Event()
        return sse.SSEResponse(_feed(edge, stop), ping_s=edge.settings.heartbeat_s,
                               send_timeout_s=edge.settings.send_timeout_s, grace_s=OPS_FEED_INTERVAL_S,
                               shutdown_event=stop)


async def _feed(edge: Edge, stop: anyio.Event) -> AsyncIterator[bytes]:
    """A `snapshot` event a second until the server stops (sse-starlette sets `stop`)."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            body = orjson.dumps(await snapshot(edge))
        except redis.RedisError as exc:
            body = orjson.dumps({"error": f"Redis unreachable: {exc}"})
        yield sse.frame(body, id=n, event="snapshot")
        with anyio.move_on_after(OPS_FEED_INTERVAL_S):
            await stop.wait()


async def refresh_gauges(edge: Edge) -> None:
    for model in await edge.models():
        edge.metrics.queue_depth.labels(model).set(await edge.queue_redis.llen(keys.queue_list(model)))
        edge.metrics.workers_live.labels(model).set(await edge.live_workers(model))


async def snapshot(edge: Edge) -> dict[str, Any]:
    r = edge.redis
    now = time.time()
    models, workers = [], []
    for model in await edge.models():
        names = await registry.live_workers_async(r, model)
        models.append({"name": model, "queue_depth": await edge.queue_redis.llen(keys.queue_list(model)),
                       "workers_live": len(names)})
        workers += [(await registry.worker_info(r, name)).as_json() for name in names]
    active = await r.zrange(keys.active(), 0, OPS_MAX_STREAMS - 1)
    found = [await _stream(edge, sid.decode(), now) for sid in active]
    streams = [s for s in found if s]
    errors = [orjson.loads(e) for e in await r.lrange(keys.errors(), 0, ERRORS_SHOWN - 1)]
    return {
        "time": now, "models": models, "workers": workers, "streams": streams, "errors": errors,
        "totals": {"active_streams": sum(s["status"] == StreamStatus.RUNNING for s in streams),
                   "queued": sum(s["status"] == StreamStatus.QUEUED for s in streams),
                   "workers_live": len(workers)},
    }


async def _stream(edge: Edge, sid: str, now: float) -> dict[str, Any] | None:
    st = await StreamState.aload(edge.redis, sid, with_request=False)
    if st is None or st.ended:
        if st is None:
            await edge.redis.zrem(keys.active(), sid)
        return None
    tokens = await edge.redis.xlen(keys.log(sid))
    age = max(0.0, now - (st.created or now))
    n_tok = max(0, tokens - 2)  # the log's meta and disclosure events are not tokens
    return {"id": sid, "model": st.model, "status": st.status.value, "worker": st.worker,
            "tokens": n_tok, "tokens_per_s": round(n_tok / age, 1) if age > 0 else 0.0, "age_s": round(age, 1)}
