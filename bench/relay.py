"""Scenarios 1 and 2: what relaying costs and how much one API process relays.

Both run the real API process (pinned to one CPU where there are two or
more) against a real Redis; streams are created through the API
(`POST /v1/streams`), their RQ jobs dropped, and the publisher process
(`bench_publisher`) plays their workers through the worker's own publish
script. The client process follows every stream with `GET /v1/streams/{id}`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenfan.bench.procs import BenchError, Child, LineChild, Stack, cpu_seconds, progress, rss_bytes
from tokenfan.bench.stats import rate

CLIENT = "tokenfan.bench.client"
PUBLISHER = "tokenfan.bench.publisher"
# What every benchmark stream is created with; the publisher decides its length.
STREAM_BODY = {"messages": [{"role": "user", "content": "benchmark"}], "max_tokens": 4096}
# The bench's publisher, not RQ, claims the streams: their jobs are dropped, yet the
# queue bound (TOKENFAN_MAX_QUEUE) counts them until then, so it is lifted for the bench.
API_ENV = {"TOKENFAN_MAX_QUEUE": "1000000"}
# Streams and tokens of the warm-up run that loads every code path of a new API process.
WARMUP = (20, 20)
# Events/s assumed when sizing a flat-out run: about what two publishers reach here.
FLAT_OUT_GUESS = 40_000.0
# Idle time before a burst proof: longer than a follower's viewer refresh (VIEWER_TTL_S / 3).
BURST_HOLD_S = 4.0
# Share of their CPUs above which the client, publishers and Redis count as the bottleneck.
GENERATOR_BOUND_PCT = 90.0
# The idle ladder stops at the first level where fewer streams than this share could connect.
CONNECTED_ENOUGH = 0.9


@dataclass(frozen=True)
class RelayPlan:
    streams: int
    rate: float  # tokens per second per stream; 0: as fast as possible
    tokens: int  # per stream
    publishers: int = 1
    hold_s: float = 0.0  # idle time between all connected and the first token
    mode: str = "follow"  # "redis": the client reads the channels from Redis itself (the floor)


def _create(stack: Stack, api: Child, plan: RelayPlan) -> tuple[LineChild, list[str]]:
    job: dict[str, Any] = {"mode": plan.mode, "host": "127.0.0.1", "port": api.port, "redis_url": stack.redis_url,
           "create": {"count": plan.streams, "body": STREAM_BODY},
           "ready_timeout_s": 120, "finish_timeout_s": 600}
    client = stack.line_child("client", CLIENT, job)
    sids = client.expect("created", 300)["sids"]
    if len(sids) != plan.streams:
        raise BenchError(f"the API created {len(sids)} of {plan.streams} streams")
    stack.drain_queue()
    return client, sids


def _publishers(stack: Stack, sids: list[str], plan: RelayPlan) -> list[LineChild]:
    k = max(1, plan.publishers)
    pubs = []
    for i in range(k):
        part = sids[i::k]
        job = {"redis_url": stack.redis_url, "sids": part, "rate": plan.rate, "tokens": plan.tokens, "index": i}
        pubs.append(stack.line_child(f"publisher{i}", PUBLISHER, job))
    for p in pubs:
        p.expect("ready", 300)
    return pubs


def relay_run(stack: Stack, api: Child, plan: RelayPlan, measure_rss: bool = False) -> dict[str, Any]:
    """One run: create, claim, connect, (hold), publish, collect."""
    client, sids = _create(stack, api, plan)
    pubs = _publishers(stack, sids, plan)
    rss_before = rss_bytes(api.pid)
    client.send("connect")
    ready = client.expect("ready", 300)
    out: dict[str, Any] = {"streams": plan.streams, "connected": ready["ready"], "connect_failed": ready["failed"]}
    if measure_rss:
        out["rss_before"], out["rss_after"] = rss_before, rss_bytes(api.pid)
    if plan.hold_s:
        time.sleep(plan.hold_s)
    if measure_rss:
        out["rss_after_hold"] = rss_bytes(api.pid)
    load_pids = {"client": [client.pid], "publishers": [p.pid for p in pubs], "redis": [stack.redis_pid]}
    t0, cpu0, load0 = time.monotonic(), cpu_seconds(api.pid), _cpu_by_role(load_pids)
    for p in pubs:
        p.send("go")
    pub_results = [p.expect("result", 900) for p in pubs]
    t1, cpu1, load1 = time.monotonic(), cpu_seconds(api.pid), _cpu_by_role(load_pids)
    got = client.expect("result", 900)
    for c in (client, *pubs):
        stack.stop(c)
    stack.flush()
    out.update(_summarise(plan, pub_results, got))
    # CPU over the publishing phase, as a share of one CPU (the client, publishers and Redis added up)
    out["api_cpu_pct"] = round(100 * (cpu1 - cpu0) / max(t1 - t0, 1e-6), 1)
    out["load_cpu_by_role_pct"] = {k: round(100 * (load1[k] - load0[k]) / max(t1 - t0, 1e-6), 1) for k in load0}
    out["load_cpu_pct"] = round(sum(out["load_cpu_by_role_pct"].values()), 1)
    # The load generators used (nearly) all their CPUs: the figures then bound the API from below only.
    load_cpus = len(stack.layout.load) or os.cpu_count() or 1
    out["generator_bound"] = out["load_cpu_pct"] >= GENERATOR_BOUND_PCT * load_cpus
    return out


def _cpu_by_role(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(pid) for pid in group) for role, group in pids.items()}


def _summarise(plan: RelayPlan, pubs: list[dict[str, Any]], got: dict[str, Any]) -> dict[str, Any]:
    t_go = min(p["t_go"] for p in pubs)
    t_end = max(p["t_end"] for p in pubs)
    window = max(t_end - t_go, 1e-6)
    published = sum(p["tokens"] for p in pubs)
    delivered = _in_window(got["buckets"], t_go, t_end)
    return {
        "rate_per_stream": plan.rate,
        "offered_per_s": round(plan.rate * plan.streams, 1),
        "published_per_s": rate(published, window),
        "delivered_in_window_per_s": rate(delivered, window),
        "tokens_published": published,
        "create_retries": got.get("create_retries", 0),
        "tokens_received": got["tokens"],
        "finished": got["finished"],
        "failed": got["failed"] + got["error_events"] + sum(p["fenced"] for p in pubs),
        "lag_ms": got["lag_ms"],
        "seconds": round(window, 2),
    }


def _in_window(buckets: dict[str, int], t0: float, t1: float) -> int:
    lo, hi = int(t0 * 10), int(t1 * 10)
    return sum(v for k, v in buckets.items() if lo <= int(k) <= hi)


def warm_up(stack: Stack, api: Child) -> None:
    relay_run(stack, api, RelayPlan(WARMUP[0], 200.0, WARMUP[1]))


# --- scenario 1 -------------------------------------------------------------

def relay_overhead(stack: Stack, levels: list[tuple[int, float, float]], floor: bool = True) -> dict[str, Any]:
    """Publish-to-receipt latency of token events at each (streams, rate, seconds) level.

    With `floor`, each level runs a second time with the client reading the
    channels straight from Redis: the part of the latency that is not the API's.
    """
    api = stack.api(pinned=True, extra=API_ENV)
    warm_up(stack, api)
    rows = []
    for streams, per_s, seconds in levels:
        progress(f"relay overhead: {streams} streams at {per_s:g} tokens/s each for {seconds:g}s")
        plan = RelayPlan(streams, per_s, max(1, int(per_s * seconds)), 1 if streams * per_s < 20_000 else 2)
        row = relay_run(stack, api, plan)
        progress(f"  p50 {row['lag_ms'].get('p50')} ms, p99 {row['lag_ms'].get('p99')} ms, "
                 f"{row['tokens_received']}/{row['tokens_published']} tokens, API CPU {row['api_cpu_pct']}%, "
                 f"client+publisher+Redis CPU {row['load_cpu_pct']}%, failed {row['failed']}")
        if floor:
            row["floor"] = relay_run(stack, api, replace(plan, mode="redis"))
            progress(f"  floor (client on Redis directly): p50 {row['floor']['lag_ms'].get('p50')} ms, "
                     f"p99 {row['floor']['lag_ms'].get('p99')} ms")
        rows.append(row)
    stack.stop(api)
    return {"levels": rows, "targets": _relay_targets(rows)}


def _relay_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at = next((r for r in rows if r["streams"] == 100), None)
    if at is None:
        return []
    lag = at["lag_ms"]
    return [
        {"what": "relay overhead p50 at 100 streams", "target": "<= 1 ms", "value": f"{lag.get('p50')} ms",
         "met": lag.get("p50", 1e9) <= 1.0},
        {"what": "relay overhead p99 at 100 streams", "target": "<= 5 ms", "value": f"{lag.get('p99')} ms",
         "met": lag.get("p99", 1e9) <= 5.0},
    ]


# --- scenario 2 -------------------------------------------------------------

def capacity(stack: Stack, streams: int, offered: list[float], seconds: float,
             idle_levels: list[int], hold_s: float, burst_at: int) -> dict[str, Any]:
    api = stack.api(pinned=True, extra=API_ENV)
    warm_up(stack, api)
    steps = _throughput_steps(stack, api, streams, offered, seconds)
    stack.stop(api)
    idle = _idle_ladder(stack, idle_levels, hold_s)
    if burst_at:
        idle.append(idle_level(stack, burst_at, BURST_HOLD_S, "burst"))
    return {"throughput": steps, "idle": idle, "targets": _capacity_targets(steps, idle)}


def _throughput_steps(stack: Stack, api: Child, streams: int, offered: list[float],
                      seconds: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for total in offered:
        per_s = total / streams
        tokens = max(1, int((total or FLAT_OUT_GUESS) * seconds / streams))
        label = f"{total:g} events/s offered" if total else "publishers flat out"
        progress(f"capacity: {streams} streams, {label}")
        row = relay_run(stack, api, RelayPlan(streams, per_s, tokens, 2 if total == 0 or total > 15_000 else 1))
        progress(f"  delivered {row['delivered_in_window_per_s']}/s (published {row['published_per_s']}/s), "
                 f"API CPU {row['api_cpu_pct']}%, client+publisher+Redis CPU {row['load_cpu_pct']}%, "
                 f"failed {row['failed']}, lag p50 {row['lag_ms'].get('p50')} ms "
                 f"p99 {row['lag_ms'].get('p99')} ms")
        rows.append(row)
        if _saturated(row):
            progress("  far past saturation: stopping the ramp")
            break
    return rows


def _saturated(row: dict[str, Any]) -> bool:
    """Far past what the API (or the machine) keeps up with: the next step would only measure a queue.

    A busy load generator alone does not stop the ramp: the publisher and the
    client batch more per call as the rate rises, so their CPU use flattens.
    """
    hopeless = row["delivered_in_window_per_s"] < 0.5 * row["published_per_s"]
    return bool(hopeless or row["failed"] > row["streams"] // 2)


def _idle_ladder(stack: Stack, levels: list[int], hold_s: float) -> list[dict[str, Any]]:
    """Up the ladder until the API no longer accepts the connections (a failed proof does not stop it)."""
    rows = []
    for n in levels:
        row = idle_level(stack, n, hold_s, "staggered")
        rows.append(row)
        if row["connected"] < CONNECTED_ENOUGH * n:
            break
    return rows


def idle_level(stack: Stack, n: int, hold_s: float, kind: str, pythonpath: Path | None = None) -> dict[str, Any]:
    """N idle streams on a fresh, warmed API process: RSS per stream, then proof that each one is alive.

    The proof is one token per stream then `done`: "staggered" spreads the
    tokens over one second, "burst" publishes them all at once after the
    streams sat idle for longer than a follower's viewer refresh.
    """
    progress(f"idle streams: opening {n} on a fresh API process ({kind} proof)")
    api = stack.api(pinned=True, extra=API_ENV, pythonpath=pythonpath)
    warm_up(stack, api)
    plan = RelayPlan(n, 1.0 if kind == "staggered" else 0.0, 1, 1, hold_s)
    row = relay_run(stack, api, plan, measure_rss=True)
    stack.stop(api)
    row["kind"] = kind
    row["held"] = row["connected"] == n and row["finished"] == n and row["failed"] == 0
    row["kb_per_stream"] = round((row["rss_after"] - row["rss_before"]) / 1024 / max(n, 1), 1)
    progress(f"  held {row['finished']}/{n}, RSS {row['rss_before'] // 2**20} -> "
             f"{row['rss_after'] // 2**20} MiB, {row['kb_per_stream']} KB per idle stream")
    return row


def _capacity_targets(steps: list[dict[str, Any]], idle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best = max((s["delivered_in_window_per_s"] for s in steps), default=0.0)
    top = next((s for s in steps if s["delivered_in_window_per_s"] == best), None)
    per_cpu = best / (top["api_cpu_pct"] / 100) if top and top["api_cpu_pct"] else 0.0
    staggered = [r for r in idle if r["kind"] == "staggered"]
    held = max((r["streams"] for r in staggered if r["held"]), default=0)
    # Memory: the largest level where every stream connected (measured before the proof).
    full = [r for r in staggered if r["connected"] == r["streams"]]
    kb = full[-1]["kb_per_stream"] if full else None
    return [
        {"what": "token events/s delivered by one API process", "target": ">= 20,000",
         "value": f"{best:,.0f} ({per_cpu:,.0f} per API CPU-second)", "met": best >= 20_000},
        {"what": "concurrent open streams held (all connected, each then delivered a token and done)",
         "target": ">= 2,000", "value": f"{held:,}", "met": held >= 2_000},
        {"what": "memory per idle stream" + (f" (at {full[-1]['streams']:,} streams)" if full else ""),
         "target": "<= 64 KB", "value": f"{kb} KB", "met": kb is not None and kb <= 64},
    ]
