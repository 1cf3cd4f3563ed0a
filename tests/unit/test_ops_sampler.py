"""The ops charts' sampler (api/ops.py History) on fakeredis: more streams than one pipeline reads
(OPS_SAMPLE_CHUNK) are all counted, and their tokens/s is the growth of their logs."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import pytest

from tokenfan.api.ops import History
from tokenfan.shared import events, keys
from tokenfan.shared.defaults import OPS_FEED_INTERVAL_S, OPS_SAMPLE_CHUNK
from tokenfan.shared.state import Field as F


class Edge:
    """What the sampler reads of the edge: its Redis, and the models (none: no workers' slots)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def models(self) -> list[str]:
        return []


async def _log(r: Any, sid: str, created: float, tokens: int) -> None:
    """A stream's log as a worker writes it: meta, disclosure, then tokens a tenth of a second apart."""
    first: list[events.Event] = [events.Meta(1, sid, "m", "w", created, False), events.Disclosure(2, "AI")]
    for e in first + [events.Token(seq, "x") for seq in range(3, 3 + tokens)]:
        e.ts = created + 0.1 * e.seq
        await r.xadd(keys.log(sid), {"e": e.encode()})


@pytest.mark.parametrize("streams", [1, OPS_SAMPLE_CHUNK, 2 * OPS_SAMPLE_CHUNK + 3])
async def test_every_stream_is_sampled_whatever_the_pipelines(streams: int) -> None:
    r = fakeredis.FakeAsyncRedis()
    history, edge = History(), Edge(r)
    assert await history.sample(edge) is None  # the first one sets the baseline
    created = time.time() - 5
    for i in range(streams):
        sid = f"s{i}"
        await r.hset(keys.state(sid), mapping={F.STATUS: "running", F.MODEL: "m", F.CREATED: str(created)})
        await r.zadd(keys.active(), {sid: i})
        await _log(r, sid, created, 3)
    point = await history.sample(edge)
    assert point is not None and point["running"] == streams and point["queued"] == 0
    assert point["tokens_per_s"] == {"m": round(3 * streams / OPS_FEED_INTERVAL_S, 1)}
    # every stream's first token was read (its own pipeline too): 0.3 s after it was created
    assert point["ttft_p50"] == point["ttft_p95"] == pytest.approx(0.3, abs=1e-3)
    await r.aclose()
