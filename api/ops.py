"""The ops view: one snapshot of models, queues, workers, streams and errors,
served as JSON, as a live SSE feed, and as the static page `/ops`.

The feed is an sse-starlette response like the streams (api/sse.py), but it
has nothing to hand over at shutdown: it ends as soon as the library sees
the server stopping (its `shutdown_event`), and the page's EventSource
reconnects to another replica.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import redis
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from redis.asyncio import Redis as AsyncRedis

from tokenfan.api import sse
from tokenfan.shared import events, keys, registry
from tokenfan.shared.defaults import (
    ERRORS_SHOWN,
    OPS_FEED_INTERVAL_S,
    OPS_HISTORY_S,
    OPS_MAX_STREAMS,
    OPS_TTFT_WINDOW_S,
)
from tokenfan.shared.state import StreamState, StreamStatus

if TYPE_CHECKING:
    from tokenfan.api.edge import Edge

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    app.state.ops_history = History()

    @app.get("/ops", include_in_schema=False, response_model=None)
    async def ops_page() -> Response:
        return FileResponse(STATIC / "ops.html")

    errors: dict[int | str, dict[str, Any]] = {s: {"description": "error, OpenAI's shape"} for s in (401, 403, 503)}

    @app.get("/v1/ops/snapshot", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                                            **errors})
    async def ops_snapshot(request: Request) -> Response:
        await request.app.state.edge.auth.admin(request)
        return Response(orjson.dumps(await snapshot(request.app.state.edge)), media_type="application/json")

    @app.get("/v1/ops/history", include_in_schema=False)
    async def ops_history(request: Request) -> Response:
        """The charts' last 15 minutes; the feed's `snapshot` events carry each new sample."""
        await request.app.state.edge.auth.admin(request)
        history: History = request.app.state.ops_history
        body = {"interval_s": OPS_FEED_INTERVAL_S, "span_s": OPS_HISTORY_S, "samples": list(history.samples)}
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/v1/ops/events", response_model=None, include_in_schema=False)
    async def ops_events(request: Request) -> sse.SSEResponse:
        edge: Edge = request.app.state.edge
        await edge.auth.admin(request)
        stop = anyio.Event()
        return sse.SSEResponse(_feed(edge, stop, request.app.state.ops_history), ping_s=edge.settings.heartbeat_s,
                               send_timeout_s=edge.settings.send_timeout_s, grace_s=OPS_FEED_INTERVAL_S,
                               shutdown_event=stop)


async def _feed(edge: Edge, stop: anyio.Event, history: History) -> AsyncIterator[bytes]:
    """A `snapshot` event a second until the server stops (sse-starlette sets `stop`)."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            snap = await snapshot(edge)
            snap["sample"] = history.samples[-1] if history.samples else None
            body = orjson.dumps(snap)
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


class History:
    """The ops page's charts: one sample a feed interval, the last `OPS_HISTORY_S`, kept by this process.

    Every sample is read from Redis, so each replica draws the same fleet-wide picture: tokens/s per
    model from the growth of each stream's log (a stream that ended since the last sample is counted to
    its end), running and queued streams, TTFT p50/p95 over the streams that got a first token in the
    last `OPS_TTFT_WINDOW_S` (first token's `ts` minus the stream's `created`, what a user waits), busy
    slots per worker (the streams its record lists) and errors by code."""

    def __init__(self) -> None:
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(OPS_HISTORY_S / OPS_FEED_INTERVAL_S))
        self._tokens: dict[str, int] = {}  # stream id -> tokens in its log at the last sample
        self._models: dict[str, str] = {}
        self._ttft: deque[tuple[float, float]] = deque()  # (first token time, seconds)
        self._last_error = time.time()

    async def sample(self, edge: Edge) -> dict[str, Any]:
        r, now = edge.redis, time.time()
        active = [sid.decode() for sid in await r.zrange(keys.active(), 0, OPS_MAX_STREAMS - 1)]
        counts = {"running": 0, "queued": 0}
        rates: dict[str, float] = {}
        seen: dict[str, int] = {}
        for sid in dict.fromkeys([*active, *self._tokens]):
            state = await StreamState.aload(r, sid, with_request=False)
            if state is not None and sid in active:
                counts[state.status.value] = counts.get(state.status.value, 0) + 1
                self._models[sid] = state.model
            tokens = await self._count(r, sid, state)
            model = self._models.get(sid, "")
            grown = max(0, tokens - self._tokens.get(sid, 0))
            rates[model] = rates.get(model, 0.0) + grown / OPS_FEED_INTERVAL_S
            if sid in active:
                seen[sid] = tokens
        self._tokens = seen
        self._models = {s: m for s, m in self._models.items() if s in seen}
        point = {"time": now, "tokens_per_s": {m: round(v, 1) for m, v in rates.items() if m},
                 "running": counts["running"], "queued": counts["queued"], **self._quantiles(now),
                 "slots_busy": await _slots_busy(edge), "errors": await self._errors(r, now)}
        self.samples.append(point)
        return point

    async def _count(self, r: AsyncRedis, sid: str, state: StreamState | None) -> int:
        """Tokens in the stream's log; the first time there are some, its time to first token too."""
        entries = int(await r.xlen(keys.log(sid)))
        tokens = max(0, entries - 2 - (1 if state is None or state.ended else 0))  # meta, disclosure, end
        if tokens and sid not in self._tokens and state is not None:
            for e in _entries(await r.xrange(keys.log(sid), count=4)):
                if e.type == events.TOKEN:
                    self._ttft.append((e.ts, max(0.0, e.ts - state.created)))
                    break
        return tokens

    def _quantiles(self, now: float) -> dict[str, float | None]:
        while self._ttft and self._ttft[0][0] < now - OPS_TTFT_WINDOW_S:
            self._ttft.popleft()
        values = sorted(v for _, v in self._ttft)
        if not values:
            return {"ttft_p50": None, "ttft_p95": None}
        return {"ttft_p50": _quantile(values, 0.5), "ttft_p95": _quantile(values, 0.95)}

    async def _errors(self, r: AsyncRedis, now: float) -> dict[str, int]:
        """Errors by code since the last sample (the capped list keeps the newest)."""
        found: dict[str, int] = {}
        for raw in await r.lrange(keys.errors(), 0, ERRORS_SHOWN - 1):
            e = orjson.loads(raw)
            if float(e.get("time", 0)) > self._last_error:
                found[str(e.get("code"))] = found.get(str(e.get("code")), 0) + 1
        self._last_error = now
        return found


def _quantile(ordered: list[float], q: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def _entries(raw: list[Any]) -> list[events.Event]:
    out = []
    for _id, fields in raw:
        value = fields.get(b"e")
        if value is not None:
            out.append(events.decode(value))
    return out


async def _slots_busy(edge: Edge) -> dict[str, int]:
    """Streams each live worker's record lists (a worker with slots lists all it is generating)."""
    busy = {}
    for model in await edge.models():
        for name in await registry.live_workers_async(edge.redis, model):
            info = await registry.worker_info(edge.redis, name)
            busy[name] = len([s for s in info.stream.split(",") if s])
    return busy


async def record(edge: Edge, history: History) -> None:
    """A lifespan task: sample until the process stops (Edge.close cancels it)."""
    while True:
        try:
            await history.sample(edge)
        except redis.RedisError as exc:
            log.debug("API %s: ops history sample failed: %s", edge.name, exc)
        await anyio.sleep(OPS_FEED_INTERVAL_S)
