"""Scenario 10, `hub`: the API's hand-written pub/sub client against redis-py's own, side by side.

Issue 28 keeps `api/hub.py` (an `asyncio.Protocol` with a hiredis reader)
only if a benchmark shows what it buys over redis-py's asyncio `PubSub`.
Here both do the hub's job in a subscriber process of their own
(`bench/listener.py`: one connection, one task per channel), pinned to the
CPU the API gets in the other scenarios, while one publisher
(`bench/firehose.py`) and this scenario's Redis share the other CPU.

For each channel count, alternating pairs (hub then redis-py, then the
other way round), each side a fresh process through the same phases:

1. a warm-up burst (not recorded);
2. a fixed total rate, below both sides' capacity, for a few seconds:
   latency p50 and p99 (publish `ts` to receipt) and the subscriber's
   CPU per 1,000 events;
3. flat out: a fixed count of events published as fast as Redis takes
   them; delivered events/s (first to last receipt) and CPU per 1,000
   events. Redis's pub/sub output-buffer limit is lifted for the run, so a
   subscriber slower than the publisher is queued for, never disconnected.

CPU is the subscriber process's own (`time.process_time()` between
arming and the last event), not wall time. The machine is shared, so each
figure is the median over the pairs, and the comparison is the median of
each pair's ratio (redis-py over hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenfan.bench.listener import SIDES
from tokenfan.bench.procs import START_TIMEOUT_S, BenchError, LineChild, Stack, pin, progress
from tokenfan.bench.stats import alternating_pairs, median, pair_cells, side_medians
from tokenfan.shared import keys

# redis-py's reader on its side: `listen()`, which measured faster than a `get_message(timeout=1.0)`
# loop (see docs/benchmarks.md, scenario 10).
REDIS_PY_READ = "listen"
# (key, what, unit, True where more is better)
FIGURES = (
    ("flat_out_per_s", "delivered flat out", "events/s", True),
    ("flat_out_cpu_ms_per_1000", "subscriber CPU per 1,000 events, flat out", "ms", False),
    ("rate_cpu_ms_per_1000", "subscriber CPU per 1,000 events, fixed rate", "ms", False),
    ("rate_p50_ms", "latency p50, fixed rate", "ms", False),
    ("rate_p99_ms", "latency p99, fixed rate", "ms", False),
)
# A side that delivered at least this share of the publisher's pace flat out kept up with it: its
# figure is the publisher's (and Redis's) limit on the load CPU, a lower bound on the side's own.
BOUND_SHARE = 0.9
# A subscriber's result may take this long past its publisher's (a slow side drains a backlog).
DRAIN_TIMEOUT_S = 120.0
# Seconds a phase's publisher may take beyond its planned duration.
PUBLISH_SLACK_S = 60.0


@dataclass(frozen=True)
class HubPlan:
    channels: tuple[int, ...]
    pairs: int
    rate_per_s: float  # total over all channels, below both sides' capacity
    rate_seconds: float
    flat_events: int
    warm_events: int


def plan(quick: bool, pairs: int | None) -> HubPlan:
    if quick:
        return HubPlan((10,), pairs or 1, 500.0, 0.5, 2_000, 200)
    # 10,000 events/s is the relay scenario's 1,000 streams x 10 tokens/s; 200,000 events flat out
    # take the slower side a few seconds.
    return HubPlan((100, 1000), pairs or 3, 10_000.0, 4.0, 200_000, 5_000)


def channel_names(n: int) -> list[str]:
    return [keys.channel(f"hubbench-{i}") for i in range(n)]


def hub_versus_redis_py(stack: Stack, p: HubPlan) -> dict[str, Any]:
    _lift_output_limit(stack)
    hose = stack.line_child("firehose", "tokenfan.bench.firehose", {"redis_url": stack.redis_url})
    hose.expect("ready", START_TIMEOUT_S)
    levels = []
    for n in p.channels:
        channels = channel_names(n)

        def one(side: str, i: int, n: int = n, channels: list[str] = channels) -> dict[str, Any]:
            progress(f"hub: {n:,} channels, pair {i + 1}/{p.pairs}, {side}")
            return _one(stack, hose, side, channels, p)

        levels.append(_level(n, alternating_pairs(SIDES, p.pairs, one)))
    hose.send("quit")
    return {"pairs": p.pairs, "rate_per_s": p.rate_per_s, "rate_seconds": p.rate_seconds,
            "flat_events": p.flat_events, "redis_py_read": REDIS_PY_READ, "levels": levels,
            "targets": _targets(levels)}


def _lift_output_limit(stack: Stack) -> None:
    """Redis drops a pub/sub client 32 MB behind (or 8 MB for a minute): flat out, the slower side
    would be cut off instead of measured. The bench's own Redis only."""
    r = stack.redis()
    try:
        r.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    finally:
        r.close()


def _one(stack: Stack, hose: LineChild, side: str, channels: list[str], p: HubPlan) -> dict[str, Any]:
    job = {"side": side, "redis_url": stack.redis_url, "channels": channels, "read": REDIS_PY_READ}
    sub = stack.line_child(f"listener-{side}", "tokenfan.bench.listener", job, pinned=False)
    pin(sub.pid, stack.layout.api)  # the API's CPU in the other scenarios: the load runs on the rest
    ready = sub.expect("ready", START_TIMEOUT_S)
    _phase(sub, hose, channels, 0.0, p.warm_events, latency=False)
    fixed = _phase(sub, hose, channels, p.rate_per_s, int(p.rate_per_s * p.rate_seconds), latency=True)
    flat = _phase(sub, hose, channels, 0.0, p.flat_events, latency=False)
    sub.send("quit")
    stack.stop(sub)
    out = {"flat_out_per_s": flat["per_s"], "flat_out_cpu_ms_per_1000": flat["cpu_ms_per_1000"],
           "rate_cpu_ms_per_1000": fixed["cpu_ms_per_1000"], "rate_p50_ms": fixed["lag_ms"].get("p50", 0.0),
           "rate_p99_ms": fixed["lag_ms"].get("p99", 0.0), "parser": ready["parser"],
           "published_flat_out_per_s": flat["published_per_s"],
           "flat_out_bound": flat["per_s"] >= BOUND_SHARE * flat["published_per_s"],
           "lost": fixed["lost"] + flat["lost"],
           "rate_lag_ms": fixed["lag_ms"]}
    progress(f"  {side}: flat out {out['flat_out_per_s']:,.0f}/s (published {flat['published_per_s']:,.0f}/s), "
             f"{out['flat_out_cpu_ms_per_1000']} ms CPU/1,000; at {p.rate_per_s:,.0f}/s "
             f"p50 {out['rate_p50_ms']} ms p99 {out['rate_p99_ms']} ms, {out['rate_cpu_ms_per_1000']} ms CPU/1,000"
             + (f"; LOST {out['lost']}" if out["lost"] else ""))
    return out


def _phase(sub: LineChild, hose: LineChild, channels: list[str], rate: float, count: int,
           latency: bool) -> dict[str, Any]:
    sub.send({"expect": count, "latency": latency})
    sub.expect("armed", START_TIMEOUT_S)
    hose.send({"channels": channels, "rate": rate, "count": count})
    planned = count / rate if rate > 0 else 0.0
    sent = hose.expect("result", planned + PUBLISH_SLACK_S)
    if sent["reached"] != sent["sent"]:
        raise BenchError(f"hub: {sent['sent'] - sent['reached']} of {sent['sent']} events reached no subscriber")
    got = sub.expect("result", DRAIN_TIMEOUT_S)
    return {**got, "published_per_s": sent["achieved_per_s"]}


def _level(n: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians = side_medians(runs, (key for key, *_ in FIGURES))
    ratios = {}
    for key, *_ in FIGURES:
        pair = [b[key] / a[key] for a, b in zip(runs["hub"], runs["redis-py"], strict=True) if a[key]]
        ratios[key] = round(median(pair), 3) if pair else 0.0
    return {"channels": n, "runs": runs, "medians": medians, "ratio_redis_py_over_hub": ratios}


def _targets(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 28's question, at the largest channel count: does the hub buy anything?"""
    top = levels[-1]
    flat = top["ratio_redis_py_over_hub"]["flat_out_per_s"]
    cpu = top["ratio_redis_py_over_hub"]["rate_cpu_ms_per_1000"]
    where = f"{top['channels']:,} channels"
    return [
        {"what": f"hub's events/s flat out over redis-py's PubSub ({where})", "target": "> 1x",
         "value": f"{1 / flat:.2f}x" if flat else "-", "met": bool(flat) and flat < 1},
        {"what": f"redis-py's CPU per event over the hub's, fixed rate ({where})", "target": "> 1x",
         "value": f"{cpu:.2f}x", "met": cpu > 1},
    ]


def hub_table(r: dict[str, Any]) -> list[str]:
    rows = [f"`api.hub.Hub` against redis-py's asyncio `PubSub` (`{r['redis_py_read']}()`, hiredis), one subscriber "
            f"process a side, one task per channel; fixed rate {r['rate_per_s']:,.0f} events/s for "
            f"{r['rate_seconds']:g} s, flat out {r['flat_events']:,} events; {r['pairs']} alternating pairs, "
            "medians, and the median of the pairs' ratios (\"bound\": the side kept up with the publisher in most "
            "pairs, so its figure is the publisher's and Redis's limit, a lower bound on its own):", "",
            "| channels | figure | hub | redis-py | redis-py / hub |", "|---:|---|---:|---:|---:|"]
    for lv in r["levels"]:
        bound = {side: sum(run["flat_out_bound"] for run in lv["runs"][side]) * 2 > len(lv["runs"][side])
                 for side in SIDES}
        for key, what, unit, _ in FIGURES:
            m = lv["medians"]
            cells = [f"{m[side][key]:,}" + (" (bound)" if key == "flat_out_per_s" and bound[side] else "")
                     for side in SIDES]
            rows.append(f"| {lv['channels']:,} | {what} ({unit}) | {' | '.join(cells)} "
                        f"| {lv['ratio_redis_py_over_hub'][key]:g} |")
        pub = {side: median([run["published_flat_out_per_s"] for run in lv["runs"][side]]) for side in SIDES}
        rows.append(f"| {lv['channels']:,} | published flat out, the publisher's pace (events/s) "
                    f"| {pub['hub']:,} | {pub['redis-py']:,} | |")
    rows += ["", "Each pair (hub / redis-py):", "",
             "| channels | pair | " + " | ".join(what for _, what, _, _ in FIGURES) + " | lost |",
             "|---:|---:|" + "---:|" * (len(FIGURES) + 1)]
    for lv in r["levels"]:
        for i, (a, b) in enumerate(zip(lv["runs"]["hub"], lv["runs"]["redis-py"], strict=True), start=1):
            rows.append(f"| {lv['channels']:,} | {i} | {pair_cells(a, b, (k for k, *_ in FIGURES))} "
                        f"| {a['lost']} / {b['lost']} |")
    return rows
