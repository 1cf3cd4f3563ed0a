"""The ops view: one snapshot of models, queues, workers, streams and errors,
served as JSON, as a live SSE feed, and as the static page `/ops` (the
routes are api/routers/ops.py).

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
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import redis
from redis.asyncio import Redis as AsyncRedis

from tokenfan.api import sse
from tokenfan.shared import events, keys, registry
from tokenfan.shared.defaults import (
    ERRORS_SHOWN,
    OPS_FEED_INTERVAL_S,
    OPS_HISTORY_S,
    OPS_MAX_STREAMS,
    OPS_SAMPLE_CHUNK,
    OPS_TTFT_WINDOW_S,
)
from tokenfan.shared.state import Field as F
from tokenfan.shared.state import StreamState, StreamStatus

if TYPE_CHECKING:
    from tokenfan.api.edge import Edge

log = logging.getLogger(__name__)
# The sampler's lease lasts this many feed intervals: a stopped sampler is replaced within it.
SAMPLER_TTL_INTERVALS = 3


async def feed(edge: Edge, stop: anyio.Event) -> AsyncIterator[bytes]:
    """A `snapshot` event a second until the server stops (sse-starlette sets `stop`)."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            snap = await snapshot(edge)
            latest = await edge.redis.lindex(keys.ops_history(), 0)
            snap["sample"] = orjson.loads(latest) if latest else None
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
    """The ops page's charts: one sample a feed interval, the last `OPS_HISTORY_S`, for the whole fleet.

    One API process at a time takes the samples (it holds `keys.ops_sampler()`, renewed every interval;
    when it stops another takes over within `SAMPLER_TTL_INTERVALS`) and stores each in a capped Redis
    list that every replica serves, so N replicas cost Redis one sampler, not N, and draw the same
    charts. A sample: tokens/s per model from the growth of each stream's log (a stream that ended
    since the last sample is counted to its end), running and queued streams, TTFT p50/p95 over the
    streams that got a first token in the last `OPS_TTFT_WINDOW_S` (first token's `ts` minus the
    stream's `created`, what a user waits), busy slots per worker (the streams its record lists) and
    errors by code. Each is a few pipelined round trips, whatever the number of streams."""

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}  # stream id -> tokens in its log at the last sample
        self._models: dict[str, str] = {}
        self._ttft: deque[tuple[float, float]] = deque()  # (first token time, seconds)
        self._last_error = time.time()
        self.primed = False  # a first sample after taking over only sets the baseline of the rates

    async def sample(self, edge: Edge) -> dict[str, Any] | None:
        r, now = edge.redis, time.time()
        active = [sid.decode() for sid in await r.zrange(keys.active(), 0, OPS_MAX_STREAMS - 1)]
        sids = list(dict.fromkeys([*active, *self._tokens]))
        replies: list[Any] = []
        for at in range(0, len(sids), OPS_SAMPLE_CHUNK):  # see OPS_SAMPLE_CHUNK: the relay waits on each
            pipe = r.pipeline(transaction=False)
            for sid in sids[at:at + OPS_SAMPLE_CHUNK]:
                pipe.hmget(keys.state(sid), [F.STATUS, F.MODEL, F.CREATED])
                pipe.xlen(keys.log(sid))
            replies += await pipe.execute()
        counts = {"running": 0, "queued": 0}
        rates: dict[str, float] = {}
        seen: dict[str, int] = {}
        firsts: list[tuple[str, float]] = []
        for i, sid in enumerate(sids):
            status, model, created = (_text(v) for v in replies[2 * i])
            entries = int(replies[2 * i + 1])
            if status and sid in active:
                counts[status] = counts.get(status, 0) + 1
                self._models[sid] = model
            ended = not status or status == StreamStatus.FINISHED
            tokens = max(0, entries - 2 - (1 if ended else 0))  # meta, disclosure, end
            if tokens and sid not in self._tokens and status:
                firsts.append((sid, float(created or 0)))
            model = self._models.get(sid, "")
            rates[model] = rates.get(model, 0.0) + max(0, tokens - self._tokens.get(sid, 0)) / OPS_FEED_INTERVAL_S
            if sid in active:
                seen[sid] = tokens
        await self._first_tokens(r, firsts)
        self._tokens = seen
        self._models = {s: m for s, m in self._models.items() if s in seen}
        point = {"time": now, "tokens_per_s": {m: round(v, 1) for m, v in rates.items() if m},
                 "running": counts["running"], "queued": counts["queued"], **self._quantiles(now),
                 "slots_busy": await _slots_busy(edge), "errors": await self._errors(r, now)}
        if not self.primed:  # every token so far would count as this second's: no rate yet
            self.primed = True
            return None
        return point

    async def _first_tokens(self, r: AsyncRedis, firsts: list[tuple[str, float]]) -> None:
        """Streams whose first tokens arrived since the last sample: their time to first token."""
        if not firsts or not self.primed:
            return
        raws: list[Any] = []
        for at in range(0, len(firsts), OPS_SAMPLE_CHUNK):
            pipe = r.pipeline(transaction=False)
            for sid, _ in firsts[at:at + OPS_SAMPLE_CHUNK]:
                pipe.xrange(keys.log(sid), count=4)
            raws += await pipe.execute()
        for (_, created), raw in zip(firsts, raws, strict=True):
            first = next((e for e in _entries(raw) if e.type == events.TOKEN), None)
            if first is not None:
                self._ttft.append((first.ts, max(0.0, first.ts - created)))

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


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


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


# Take the sampler's lease, or keep it: (key, this process's name, TTL ms) -> 1 when this process samples.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""


async def record(edge: Edge) -> None:
    """A lifespan task: take the fleet's samples while this process holds the sampler lease, until the
    process stops (Edge.close cancels it)."""
    history = History()
    ttl_ms = int(SAMPLER_TTL_INTERVALS * OPS_FEED_INTERVAL_S * 1000)
    size = int(OPS_HISTORY_S / OPS_FEED_INTERVAL_S)
    while True:
        try:
            if await edge.redis.eval(_LEAD, 1, keys.ops_sampler(), edge.name, ttl_ms):
                point = await history.sample(edge)
                if point is not None:
                    pipe = edge.redis.pipeline(transaction=False)
                    pipe.lpush(keys.ops_history(), orjson.dumps(point))
                    pipe.ltrim(keys.ops_history(), 0, size - 1)
                    pipe.expire(keys.ops_history(), int(OPS_HISTORY_S))
                    await pipe.execute()
            elif history.primed:  # another process samples now: a fresh baseline if this one takes over
                history = History()
        except redis.RedisError as exc:
            log.debug("API %s: ops history sample failed: %s", edge.name, exc)
        await anyio.sleep(OPS_FEED_INTERVAL_S)
