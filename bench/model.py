"""Scenarios 3, 4 and 5: time to first token, and the real model end to end.

Scenario 3 runs a real `tokenfan worker` with the fake engine (no pacing),
so everything but the engine is tokenfan's. Scenarios 4 and 5 run the
bundled SmolLM2 GGUF through a real llama-engine worker and compare it
with llama-cpp-python called directly (4) and with llama-cpp-python's own
OpenAI server (5), same model file, threads, context and sampling
(temperature 0). Every HTTP request is made by the bench's client process.
"""

from __future__ import annotations

from typing import Any

from tokenfan.bench.procs import Child, LineChild, Stack, progress, sched_ns
from tokenfan.bench.stats import median, rate, summary
from tokenfan.shared import defaults as d
from tokenfan.shared import events
from tokenfan.shared.bus import BusConfig, SyncBus
from tokenfan.worker.engines import bundled_model_path

CLIENT = "tokenfan.bench.client"
DIRECT = "tokenfan.bench.direct"
TTFT_PROMPT = [{"role": "user", "content": "time to first token"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}]
# Requests sent before measuring: loads lazy code paths and llama.cpp's prompt cache on every side.
WARMUP_REQUESTS = 3


def run_client(stack: Stack, job: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    client = stack.line_child("client", CLIENT, {"host": "127.0.0.1", **job}, pinned=False)
    try:
        return client.expect("result", timeout)
    finally:
        stack.stop(client)


def chat_job(port: int, body: dict[str, Any], clients: int = 1, requests: int = 1, gap_s: float = 0.0,
             path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"mode": "chat", "port": port, "path": path, "body": body, "clients": clients,
            "requests": requests, "gap_s": gap_s}


# --- scenario 3 -------------------------------------------------------------

def ttft_overhead(stack: Stack, requests: int, gap_s: float) -> dict[str, Any]:
    """Request to first token event, minus the engine's own time to first token, idle warm worker."""
    api = stack.api()
    stack.worker("bench-fake", ["--engine", "fake", "--fake-rate", "0", "--fake-tokens", "8"])
    openai_body = {"messages": TTFT_PROMPT, "max_tokens": 8, "stream": True, "temperature": 0}
    native_body = {"messages": TTFT_PROMPT, "max_tokens": 8}
    run_client(stack, chat_job(api.port, openai_body, requests=WARMUP_REQUESTS, gap_s=gap_s))
    progress(f"ttft: {requests} sequential requests on the OpenAI route")
    openai = run_client(stack, chat_job(api.port, openai_body, requests=requests, gap_s=gap_s))["records"]
    progress(f"ttft: {requests} sequential POST /v1/streams + GET /v1/streams/{{id}}")
    native = run_client(stack, {"mode": "native", "port": api.port, "body": native_body, "requests": requests,
                                "gap_s": gap_s})["records"]
    routes = {"openai": _ttft_rows(stack, openai), "native": _ttft_rows(stack, native)}
    out: dict[str, Any] = {"requests": requests, "routes": {k: _ttft_summary(v) for k, v in routes.items()}}
    for name, s in out["routes"].items():
        progress(f"  {name}: overhead p50 {s['overhead_ms'].get('p50')} ms, p95 {s['overhead_ms'].get('p95')} ms")
    out["targets"] = [_ttft_target(name, s) for name, s in out["routes"].items()]
    return out


def _ttft_target(route: str, s: dict[str, Any]) -> dict[str, Any]:
    p50 = s["overhead_ms"].get("p50")
    return {"what": f"TTFT overhead p50 ({route} route)", "target": "<= 10 ms", "value": f"{p50} ms",
            "met": p50 is not None and p50 <= 10.0}


def _ttft_rows(stack: Stack, records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Join what the client saw with what the worker logged (first token `ts`, engine timings)."""
    r = stack.redis()
    bus = SyncBus(r, BusConfig(d.LOG_MAXLEN, d.LOG_ACTIVE_TTL_S, d.LOG_TTL_S))
    rows: list[dict[str, float]] = []
    try:
        for rec in records:
            logged = bus.read_log(rec["stream_id"]) if rec.get("stream_id") else []
            first = next((e for e in logged if isinstance(e, events.Token)), None)
            done = next((e for e in logged if isinstance(e, events.Done)), None)
            if not rec.get("t_first") or first is None or done is None:
                rows.append({"failed": 1.0})
                continue
            ttft = done.timings.ttft_ms
            rows.append({
                "failed": 0.0,
                "overhead_ms": (rec["t_first"] - rec["t_send"]) * 1000 - ttft,
                "to_publish_ms": (first.ts - rec["t_send"]) * 1000 - ttft,
                "relay_ms": (rec["t_first"] - first.ts) * 1000,
                "queue_wait_ms": done.timings.queue_wait_ms,
                "engine_ttft_ms": ttft,
                "total_ms": (rec["t_first"] - rec["t_send"]) * 1000,
            })
    finally:
        r.close()
    return rows


def _ttft_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    ok = [row for row in rows if not row["failed"]]
    fields = ("overhead_ms", "total_ms", "engine_ttft_ms", "queue_wait_ms", "to_publish_ms", "relay_ms")
    out: dict[str, Any] = {f: summary((row[f] for row in ok), digits=2) for f in fields}
    out["failed"] = len(rows) - len(ok)
    return out


# --- scenario 4 -------------------------------------------------------------

def _llama_worker(stack: Stack, threads: int, n_ctx: int) -> Child:
    return stack.worker(f"bench-llama-{threads}", ["--engine", "llama", "--threads", str(threads),
                                                   "--n-ctx", str(n_ctx)])


def _decode_rate(rec: dict[str, Any]) -> float:
    span = rec["t_last"] - rec["t_first"]
    return (rec["tokens"] - 1) / span if rec["tokens"] > 1 and span > 0 else 0.0


def _e2e_rate(rec: dict[str, Any]) -> float:
    span = rec["t_last"] - rec["t_send"]
    return rec["tokens"] / span if rec["tokens"] and span > 0 else 0.0


def end_to_end(stack: Stack, thread_counts: list[int], n_ctx: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """One stream's tokens/s through tokenfan against llama-cpp-python in one process, for each thread count."""
    api = stack.api()
    runs = [_e2e_run(stack, api, t, n_ctx, max_tokens, rounds) for t in thread_counts]
    first = runs[0]
    target = {"what": "one stream's tokens/s through tokenfan vs llama-cpp-python direct "
                      f"({_threads(first['threads'])}, llama-cpp-python's default here)",
              "target": ">= 95 %", "value": f"{first['ratio_pct']} %", "met": first["ratio_pct"] >= 95}
    return {"max_tokens": max_tokens, "rounds": rounds, "runs": runs, "targets": [target]}


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _e2e_run(stack: Stack, api: Child, threads: int, n_ctx: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Alternating rounds, direct then tokenfan, each side idle while the other runs."""
    worker = _llama_worker(stack, threads, n_ctx)
    direct = stack.line_child("direct", DIRECT, {"model_path": str(bundled_model_path()), "threads": threads,
                                                 "n_ctx": n_ctx, "messages": STORY, "max_tokens": max_tokens,
                                                 "temperature": 0.0}, pinned=False)
    direct.expect("ready", 120)
    body = {"messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sides: dict[str, list[dict[str, Any]]] = {"tokenfan": [], "direct": []}
    for rnd in range(rounds + 1):  # round 0 warms both sides up and is not counted
        with _Sched({"model": direct.pid}) as d_sched:
            d_rec = _direct_once(direct)
        with _Sched({"model": worker.pid, "api": api.pid, "redis": stack.redis_pid}) as t_sched:
            t_rec = run_client(stack, chat_job(api.port, body))["records"][0]
        got = {"direct": {**d_rec, "sched": d_sched.per_token(d_rec["tokens"])},
               "tokenfan": {**t_rec, "sched": t_sched.per_token(t_rec["tokens"], client_s=t_rec.get("cpu_s", 0.0))}}
        if rnd:
            for side, rec in got.items():
                sides[side].append(rec)
            progress(f"e2e, {_threads(threads)}, round {rnd}/{rounds}: tokenfan {_decode_rate(got['tokenfan']):.1f} "
                     f"tokens/s, direct {_decode_rate(got['direct']):.1f} tokens/s")
    stack.stop(direct)
    stack.stop(worker)
    return _e2e_result(sides, threads)


class _Sched:
    """Where a round's time went, per token: each process's CPU, and how long the model's threads
    waited, runnable, for a CPU someone else had (Linux schedstat)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, tuple[int, int]] = {}
        self.after: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> _Sched:
        self.before = {k: sched_ns(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.after = {k: sched_ns(p) for k, p in self.pids.items()}

    def per_token(self, tokens: int, client_s: float = 0.0) -> dict[str, float]:
        if tokens <= 0 or not self.after:
            return {}
        out = {f"{k}_cpu_us": (self.after[k][0] - self.before[k][0]) / tokens / 1000 for k in self.pids}
        out["model_wait_us"] = (self.after["model"][1] - self.before["model"][1]) / tokens / 1000
        if client_s:
            out["client_cpu_us"] = client_s / tokens * 1e6
        return out


def _direct_once(direct: LineChild) -> dict[str, Any]:
    direct.send("run")
    return direct.expect("result", 600)


def _e2e_result(sides: dict[str, list[dict[str, Any]]], threads: int) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": threads}
    for side, recs in sides.items():
        out[side] = {
            "decode_tokens_per_s": round(median([_decode_rate(r) for r in recs]), 1),
            "e2e_tokens_per_s": round(median([_e2e_rate(r) for r in recs]), 1),
            "ttft_ms": round(median([(r["t_first"] - r["t_send"]) * 1000 for r in recs if r["t_first"]]), 1),
            "tokens": [r["tokens"] for r in recs],
            "failed": sum(1 for r in recs if r.get("error") or r.get("status") != 200 or not r["tokens"]),
            "per_token_us": {k: round(median([r["sched"][k] for r in recs if k in r.get("sched", {})]), 1)
                             for k in sorted({k for r in recs for k in r.get("sched", {})})},
        }
    out["same_text"] = {r["text_crc"] for r in sides["direct"]} == {r["text_crc"] for r in sides["tokenfan"]}
    # Each round pairs two runs made seconds apart: their ratio shrugs off the machine's slower minutes.
    pairs = [_decode_rate(t) / _decode_rate(d) for t, d in zip(sides["tokenfan"], sides["direct"], strict=True)
             if _decode_rate(d) > 0]
    out["round_ratios_pct"] = [round(100 * p, 1) for p in pairs]
    out["ratio_pct"] = round(100 * median(pairs), 1) if pairs else 0.0
    progress(f"  {_threads(threads)}: tokenfan at {out['ratio_pct']}% of llama-cpp-python's own speed "
             "(median of the rounds' decode tokens/s ratios)")
    return out


# --- scenario 5 -------------------------------------------------------------

def versus_server(stack: Stack, threads: int, n_ctx: int, max_tokens: int, levels: list[int],
                  per_level: int, with_no_interrupt: bool) -> dict[str, Any]:
    """tokenfan (1 worker) against llama_cpp.server (1 model), the same OpenAI client code on both."""
    path = str(bundled_model_path())
    api = stack.api()
    _llama_worker(stack, threads, n_ctx)
    servers: dict[str, Child] = {"tokenfan": api, "llama_cpp.server": stack.llama_server(path, threads, n_ctx)}
    if with_no_interrupt:
        servers["llama_cpp.server (interrupt_requests off)"] = stack.llama_server(path, threads, n_ctx, False)
    body = {"model": "smollm2", "messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    for child in servers.values():
        run_client(stack, chat_job(child.port, body, requests=1))
    rows = []
    for clients in levels:
        requests = max(1, per_level // clients)
        for side, child in servers.items():
            progress(f"vs server: {side}, {clients} concurrent clients x {requests} requests")
            got = run_client(stack, chat_job(child.port, body, clients=clients, requests=requests))
            row = {"side": side, "clients": clients, **_chat_stats(got)}
            progress(f"  TTFT p50 {row['ttft_ms'].get('p50')} ms p95 {row['ttft_ms'].get('p95')} ms, "
                     f"{row['tokens_per_s']} tokens/s, completed {row['completed']}/{row['requests']}, "
                     f"interrupted {row['interrupted']}, failed {row['failed']}")
            rows.append(row)
    return {"threads": threads, "max_tokens": max_tokens, "model_instances": 1, "rows": rows, "targets": []}


def _chat_stats(got: dict[str, Any]) -> dict[str, Any]:
    recs = got["records"]
    failed = [r for r in recs if r["status"] != 200 or r["error"]]
    ended = (events.FinishReason.STOP, events.FinishReason.LENGTH)
    completed = [r for r in recs if r not in failed and r["finish"] in ended and r["done"]]
    tokens = sum(r["tokens"] for r in recs)
    wall = max(r["t_end"] for r in recs) - min(r["t_send"] for r in recs)
    return {
        "requests": len(recs),
        "completed": len(completed),
        "interrupted": len(recs) - len(completed) - len(failed),
        "failed": len(failed),
        "tokens": tokens,
        "tokens_per_s": rate(tokens, wall),
        "first_tokens": sum(1 for r in recs if r["t_first"]),
        "ttft_ms": summary(((r["t_first"] - r["t_send"]) * 1000 for r in recs if r["t_first"]), digits=1),
        "errors": sorted({(r["error"] or str(r["status"]))[:80] for r in failed}),
    }
