"""The ops view: one snapshot of models, queues, workers, streams and errors,
served as JSON, as a live SSE feed, and as the static page `/ops`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from tokenfan.shared import keys
from tokenfan.shared.defaults import WORKER_LIVE_S

if TYPE_CHECKING:
    from tokenfan.api.edge import Edge

STATIC = Path(__file__).parent / "static"
# Streams listed on the page at most: the page is a glance, not a database.
MAX_STREAMS = 100
FEED_INTERVAL_S = 1.0


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
    async def ops_events(request: Request) -> StreamingResponse:
        await request.app.state.edge.auth.admin(request)
        return StreamingResponse(_feed(request.app.state.edge), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _feed(edge: Edge) -> AsyncIterator[bytes]:
    n = 0
    while True:
        n += 1
        try:
            body = orjson.dumps(await snapshot(edge))
        except redis.RedisError as exc:
            body = orjson.dumps({"error": f"Redis unreachable: {exc}"})
        yield b"id: %d\nevent: snapshot\ndata: %s\n\n" % (n, body)
        await asyncio.sleep(FEED_INTERVAL_S)


async def refresh_gauges(edge: Edge) -> None:
    for model in await edge.models():
        edge.metrics.queue_depth.labels(model).set(await edge.queue_redis.llen(keys.queue_list(model)))
        edge.metrics.workers_live.labels(model).set(await edge.live_workers(model))


async def snapshot(edge: Edge) -> dict[str, Any]:
    r = edge.redis
    now = time.time()
    models, workers = [], []
    for model in await edge.models():
        names = await r.zrangebyscore(keys.workers(model), int((now - WORKER_LIVE_S) * 1000), "+inf")
        models.append({"name": model, "queue_depth": await edge.queue_redis.llen(keys.queue_list(model)),
                       "workers_live": len(names)})
        for name in names:
            workers.append(_worker(name.decode(), await r.hgetall(keys.worker(name.decode()))))
    found = [await _stream(edge, sid.decode(), now) for sid in await r.zrange(keys.active(), 0, MAX_STREAMS - 1)]
    streams = [s for s in found if s]
    errors = [orjson.loads(e) for e in await r.lrange(keys.errors(), 0, 19)]
    return {
        "time": now, "models": models, "workers": workers, "streams": streams, "errors": errors,
        "totals": {"active_streams": sum(s["status"] == "running" for s in streams),
                   "queued": sum(s["status"] == "queued" for s in streams),
                   "workers_live": len(workers)},
    }


def _worker(name: str, h: dict[bytes, bytes]) -> dict[str, Any]:
    def get(k: str) -> str:
        return h.get(k.encode(), b"").decode()

    return {"name": name, "model": get("model"), "state": get("state") or "unknown", "stream": get("stream"),
            "host": get("host"), "pid": int(get("pid") or 0), "jobs": int(get("jobs") or 0),
            "last_seen": float(get("last_seen") or 0)}


async def _stream(edge: Edge, sid: str, now: float) -> dict[str, Any] | None:
    fields = ("model", "status", "worker", "created")
    values = await edge.redis.hmget(keys.state(sid), fields)
    st = {k: v.decode() for k, v in zip(fields, values, strict=True) if v is not None}
    if not st or st.get("status") == "finished":
        if not st:
            await edge.redis.zrem(keys.active(), sid)
        return None
    tokens = await edge.redis.xlen(keys.log(sid))
    age = max(0.0, now - float(st.get("created", now)))
    n_tok = max(0, tokens - 2)
    return {"id": sid, "model": st.get("model", ""), "status": st.get("status", ""), "worker": st.get("worker", ""),
            "tokens": n_tok, "tokens_per_s": round(n_tok / age, 1) if age > 0 else 0.0, "age_s": round(age, 1)}
