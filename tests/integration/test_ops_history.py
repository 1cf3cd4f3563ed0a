"""The ops charts' history: one sampler for the fleet, served alike by every replica, and taken over
when the sampling process dies."""

from __future__ import annotations

import itertools
import signal
from typing import Any

import httpx
import orjson
import redis

from tests.procs import Cluster, Proc, create_stream, read_stream, wait_for
from tokenfan.shared import keys
from tokenfan.shared.defaults import OPS_FEED_INTERVAL_S


def _samples(api: Proc) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = httpx.get(f"{api.url}/v1/ops/history", timeout=10).json()["samples"]
    return got


def _sampler(r: redis.Redis, apis: list[Proc]) -> Proc:
    """The API process holding the sampler lease, found through the API registry (name -> its address)."""
    holder = r.get(keys.ops_sampler())
    assert holder is not None, "no API process holds the sampler lease"
    record = orjson.loads(r.hget(keys.api_processes(), holder) or b"{}")
    matches = [a for a in apis if a.url.endswith(f"//{record.get('address')}")]
    assert len(matches) == 1, (holder, record)
    return matches[0]


def test_two_replicas_draw_one_history_and_the_other_takes_over(cluster: Cluster, r: redis.Redis) -> None:
    apis = [cluster.api(), cluster.api()]
    cluster.worker(TOKENFAN_FAKE_RATE="30")
    sid = create_stream(apis[0].url, "the ops charts", max_tokens=40)
    read_stream(apis[0].url, sid, timeout=30)
    wait_for(lambda: len(_samples(apis[0])) >= 4, timeout=30, what="four samples in the history")

    first, second = _samples(apis[0]), _samples(apis[1])
    by_time = {s["time"]: s for s in first}
    shared = [s for s in second if s["time"] in by_time]
    assert len(shared) >= 3 and all(by_time[s["time"]] == s for s in shared), "the replicas serve one history"
    times = sorted({s["time"] for s in first + second})
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # one sampler: a sample an interval (two samplers would interleave samples a fraction of one apart)
    assert min(gaps) > 0.5 * OPS_FEED_INTERVAL_S, gaps
    assert any(s["tokens_per_s"].get("smollm2", 0) > 0 for s in first), first

    sampler = _sampler(r, apis)
    other = apis[1] if sampler is apis[0] else apis[0]
    before = max(s["time"] for s in _samples(other))
    sampler.signal(signal.SIGKILL)
    wait_for(lambda: not sampler.alive(), timeout=10, what="the sampling API to die")
    # the lease lapses within a few intervals; the survivor takes it and the history goes on
    wait_for(lambda: sum(s["time"] > before for s in _samples(other)) >= 3, timeout=30,
             what="new samples from the surviving replica")
    assert _sampler(r, [other]) is other
