"""Scenario 6 (`batch`): one tokenfan worker with N slots against llama.cpp's own `llama-server --parallel N`.

Both sides hold one model instance of the same GGUF file (the bundled
SmolLM2), with the same llama.cpp code (the peer is built from the
llama.cpp that the installed llama-cpp-python vendors: bench/peer.py), the
same threads, the same context per stream (llama-server's `-c` is the sum
over its slots) and continuous batching on. The bench's one client process
drives both on `/v1/chat/completions` with `stream: true`, at each level of
concurrent clients, each client sending its requests one after the other.

Deliberate choices:
- both sides are up for the whole run and take turns, cell by cell, in
  alternating order (tokenfan first in one round, llama-server first in the
  next), so a slow minute of the machine hits both; a cell's tokens/s is
  the median of its rounds, and the ratio is the median of the rounds'
  paired ratios (as in scenario 4);
- TTFT percentiles pool every request of every round of a cell;
- the tokenfan worker gets `--slots` only when its `--help` lists it (the
  option arrives with continuous batching, issue 12); without it the worker
  serves one stream at a time, the result records that (`worker_slots: 1`)
  and the targets then measure today's worker against the batching peer;
- the prompt is the same for every request, as in scenario 5: both sides
  may reuse its cached prefix; it is a few dozen tokens against 64
  generated, so decode dominates;
- the model process's RSS is read after every cell (its largest reading is
  reported) and its peak (VmHWM) at the end; both sides map the same model
  file, so the difference is the KV cache, buffers and the runtime.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfan.bench.model import STORY, WARMUP_REQUESTS, _chat_stats, chat_job, run_client
from tokenfan.bench.peer import LlamaServer, Peer
from tokenfan.bench.procs import BenchError, Child, Stack, progress, rss_bytes
from tokenfan.bench.stats import median
from tokenfan.worker.engines import bundled_model_path

# The targets at the top level (clients = slots): tokenfan's aggregate tokens/s at least this share
# of llama-server's, and its TTFT p95 at most this multiple of llama-server's.
TARGET_TOKENS_PCT = 95.0
TARGET_TTFT_P95_X = 1.5
HELP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Plan:
    """One run's sizes."""

    n_ctx: int
    slots: int
    max_tokens: int
    levels: tuple[int, ...]
    requests: int  # requests per cell, at least (and at least two per client)
    rounds: int

    def per_client(self, clients: int) -> int:
        return max(2, -(-self.requests // clients))


def batch_versus_server(stack: Stack, thread_counts: list[int], plan: Plan, peer: Peer | None = None) -> dict[str, Any]:
    """tokenfan (API + one worker with `plan.slots` slots) against a peer with as many (llama-server by default)."""
    peer = peer or LlamaServer()
    about = peer.prepare()
    slots = plan.slots if worker_takes_slots() else 1
    if slots != plan.slots:
        progress(f"batch: this tokenfan worker has no --slots (continuous batching, issue 12): it serves one stream "
                 f"at a time against {peer.name} with {plan.slots} slots")
    api = stack.api()
    runs = [_threads_run(stack, api, peer, threads, plan, slots) for threads in thread_counts]
    return {"n_ctx": plan.n_ctx, "slots": plan.slots, "worker_slots": slots, "max_tokens": plan.max_tokens,
            "rounds": plan.rounds, "levels": list(plan.levels), **about, "sides": ["tokenfan", peer.name],
            "runs": runs, "targets": [t for run in runs for t in _targets(run, plan, slots, peer.name)]}


def worker_takes_slots() -> bool:
    """Whether `tokenfan worker --help` lists `--slots` (asked of a child, as the bench starts the worker)."""
    out = subprocess.run([sys.executable, "-m", "tokenfan.ops", "worker", "--help"], capture_output=True, text=True,
                         timeout=HELP_TIMEOUT_S, check=False)
    if out.returncode != 0:
        raise BenchError(f"`tokenfan worker --help` exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return "--slots" in out.stdout


def _tokenfan_worker(stack: Stack, threads: int, plan: Plan, slots: int) -> Child:
    args = ["--engine", "llama", "--threads", str(threads), "--n-ctx", str(plan.n_ctx)]
    if slots > 1:
        args += ["--slots", str(slots)]
    try:
        return stack.worker(f"bench-batch-{threads}", args)
    except BenchError as exc:  # the worker's own one-line complaint (a refused --slots) comes first
        lines = [ln for ln in str(exc).splitlines() if "error:" in ln.lower()]  # argparse's and click's
        raise BenchError(f"the tokenfan worker refused {' '.join(args)}: {lines[-1].strip()}" if lines
                         else str(exc)) from None


def _threads_run(stack: Stack, api: Child, peer: Peer, threads: int, plan: Plan, slots: int) -> dict[str, Any]:
    worker = _tokenfan_worker(stack, threads, plan, slots)
    server = peer.start(stack, str(bundled_model_path()), threads, plan.n_ctx, plan.slots)
    sides = {"tokenfan": (api.port, worker), peer.name: (server.port, server)}
    body = {"model": "smollm2", "messages": STORY, "max_tokens": plan.max_tokens, "temperature": 0, "stream": True}
    for port, _ in sides.values():
        # one stream alone, then every slot at once: a slot's first stream and the first batch of each width
        # are slow once (graph building, a cold slot), on both sides
        run_client(stack, chat_job(port, body, requests=WARMUP_REQUESTS))
        run_client(stack, chat_job(port, body, clients=plan.slots, requests=2))
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in range(plan.rounds):
        for i, clients in enumerate(plan.levels):
            order = list(sides) if (rnd + i) % 2 == 0 else list(sides)[::-1]
            for side in order:
                port, child = sides[side]
                got = run_client(stack, chat_job(port, body, clients=clients, requests=plan.per_client(clients)))
                got["rss"] = rss_bytes(child.pid)
                cells.setdefault((side, clients), []).append(got)
                _say(threads, rnd, plan.rounds, side, clients, got)
    peaks = {side: _peak_rss(child.pid) for side, (_, child) in sides.items()}
    stack.stop(server)
    stack.stop(worker)
    return _threads_result(threads, plan, cells, peaks, list(sides))


def _say(threads: int, rnd: int, rounds: int, side: str, clients: int, got: dict[str, Any]) -> None:
    s = _chat_stats(got)
    progress(f"batch, {_threads(threads)}, round {rnd + 1}/{rounds}, {clients} clients, {side}: "
             f"{s['tokens_per_s']} tokens/s, TTFT p95 {s['ttft_ms'].get('p95')} ms, "
             f"completed {s['completed']}/{s['requests']}")


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (Linux VmHWM, bytes; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _threads_result(threads: int, plan: Plan, cells: dict[tuple[str, int], list[dict[str, Any]]],
                    peaks: dict[str, int], sides: list[str]) -> dict[str, Any]:
    ours, theirs = sides
    rows = [_row(side, clients, cells[(side, clients)], peaks[side]) for clients in plan.levels for side in sides]
    ratios = {clients: _ratios(cells[(ours, clients)], cells[(theirs, clients)]) for clients in plan.levels}
    alone = {row["side"]: row["text_crcs"] for row in rows if row["clients"] == 1}
    # temperature 0, one stream at a time: the same answer on both sides says both built the same prompt
    same_text = alone[ours] == alone[theirs] if len(alone) == 2 else None
    return {"threads": threads, "rows": rows, "ratios": [{"clients": c, **r} for c, r in ratios.items()],
            "same_text_alone": same_text}


def _row(side: str, clients: int, rounds: list[dict[str, Any]], peak: int) -> dict[str, Any]:
    pooled = _chat_stats({"records": [r for got in rounds for r in got["records"]]})
    per_round = [_chat_stats(got)["tokens_per_s"] for got in rounds]
    first = [r for r in rounds[0]["records"] if not r["error"]] if clients == 1 else []
    return {
        "side": side, "clients": clients, "requests": pooled["requests"], "completed": pooled["completed"],
        "broken": pooled["requests"] - pooled["completed"], "failed": pooled["failed"], "tokens": pooled["tokens"],
        "tokens_per_s": round(median(per_round), 1), "round_tokens_per_s": per_round, "ttft_ms": pooled["ttft_ms"],
        "rss_mib": round(max(got["rss"] for got in rounds) / 2**20, 1), "peak_rss_mib": round(peak / 2**20, 1),
        "errors": pooled["errors"], "text_crcs": sorted({r["text_crc"] for r in first}),
    }


def _ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """tokenfan against the peer in one cell: median of the rounds' tokens/s ratios, pooled TTFT p95 ratio."""
    pairs = [_chat_stats(a)["tokens_per_s"] / _chat_stats(b)["tokens_per_s"]
             for a, b in zip(ours, theirs, strict=True) if _chat_stats(b)["tokens_per_s"] > 0]
    p95 = [_chat_stats({"records": [r for got in side for r in got["records"]]})["ttft_ms"].get("p95")
           for side in (ours, theirs)]
    ttft_x = round(p95[0] / p95[1], 2) if p95[0] is not None and p95[1] else None
    return {"tokens_pct": round(100 * median(pairs), 1) if pairs else 0.0,
            "round_tokens_pct": [round(100 * p, 1) for p in pairs], "ttft_p95_x": ttft_x}


def _targets(run: dict[str, Any], plan: Plan, worker_slots: int, peer: str) -> list[dict[str, Any]]:
    """The issue's two targets at the top level (clients = slots), for this thread count."""
    top = max(plan.levels)
    r = next(x for x in run["ratios"] if x["clients"] == top)
    slots = f"{worker_slots} slot" + ("" if worker_slots == 1 else "s")
    where = f"{top} clients, tokenfan {slots} vs {peer} with {plan.slots}, {_threads(run['threads'])}"
    ttft = r["ttft_p95_x"]
    return [
        {"what": f"aggregate tokens/s vs {peer}'s ({where})", "target": f">= {TARGET_TOKENS_PCT:g} %",
         "value": f"{r['tokens_pct']} %", "met": r["tokens_pct"] >= TARGET_TOKENS_PCT},
        {"what": f"TTFT p95 vs {peer}'s ({where})", "target": f"<= {TARGET_TTFT_P95_X:g}x",
         "value": "-" if ttft is None else f"{ttft}x", "met": ttft is not None and ttft <= TARGET_TTFT_P95_X},
    ]


def batch_table(r: dict[str, Any]) -> list[str]:
    """The Markdown table of scenario 6 (report.py renders it between the markers)."""
    slots = f"tokenfan worker --slots {r['worker_slots']}" if r["worker_slots"] > 1 else \
        "tokenfan worker without --slots (one stream at a time)"
    peer = r["peer"]
    rows = [f"{slots} against {_peer_words(r)}, {r['n_ctx']} tokens of context per stream, {r['max_tokens']} "
            f"tokens at most, temperature 0, {r['rounds']} alternating rounds, the same client code on "
            "`/v1/chat/completions` (tokens/s: median of the rounds; TTFT: every request of every round):", "",
            "| threads | clients | side | requests | tokens/s | TTFT p50 ms | TTFT p95 ms | broken "
            f"| model process RSS MiB (peak) | tokens/s vs {peer} | TTFT p95 vs {peer} |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in r["runs"]:
        ratios = {x["clients"]: x for x in run["ratios"]}
        for s in run["rows"]:
            x = ratios[s["clients"]]
            vs = (f"**{x['tokens_pct']} %** | **{x['ttft_p95_x']}x**" if s["side"] == "tokenfan" else " | ")
            rows.append(f"| {run['threads']} | {s['clients']} | {s['side']} | {s['requests']} | {s['tokens_per_s']} "
                        f"| {_ms(s['ttft_ms'], 'p50')} | {_ms(s['ttft_ms'], 'p95')} | {s['broken']} "
                        f"| {s['rss_mib']:g} ({s['peak_rss_mib']:g}) | {vs} |")
    same = {True: "yes", False: "**no**", None: "-"}
    rows += ["", "Same answer from both sides at one client (temperature 0): "
             + ", ".join(f"{_threads(run['threads'])}: {same[run['same_text_alone']]}" for run in r["runs"])]
    return rows


def _peer_words(r: dict[str, Any]) -> str:
    if r["batching"]:
        return (f"{r['peer']} --parallel {r['slots']} (built from llama-cpp-python {r['llama_cpp_python']}'s "
                "llama.cpp)")
    return f"{r['peer']} (llama-cpp-python {r['llama_cpp_python']}, one stream at a time)"


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _ms(s: dict[str, Any], key: str) -> str:
    v = s.get(key)
    return "-" if v is None else f"{v:g}"
