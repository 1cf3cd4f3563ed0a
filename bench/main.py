"""`tokenfan bench`: measure tokenfan against real processes on this machine.

Scenarios (docs/benchmarks.md says how each is measured and why):

1. `relay`    relay overhead per token event, worker publish to client receipt
2. `capacity` token events/s one API process delivers; idle streams it holds, memory per stream
3. `ttft`     time to first token added by tokenfan, idle warm worker
4. `e2e`      one stream's tokens/s with the real model, tokenfan against llama-cpp-python direct
5. `server`   tokenfan against llama-cpp-python's OpenAI server at 1, 4 and 16 clients
6. `batch`    one worker with 16 slots against llama.cpp's own llama-server --parallel 16 at 1, 4 and 16
              clients (builds llama-server from llama-cpp-python's source the first time: minutes)
7. `chaos`    a soak: `--streams` clients for `--duration` seconds (50, 10 minutes) over 2 API processes
              and 3 workers while workers, API processes and Redis are killed and restarted; streams
              hung and tokens lost or doubled (must be 0), time to recover per fault. Runs only when named.
8. `versus`   this checkout's API against another commit's (`--against DIR`, a checkout of it), in
              alternating pairs: relay p50/p99 and CPU per event at 100 streams, events/s flat out,
              memory per idle stream; each figure's change. Runs only when named.
9. `repack`   TOKENFAN_CPU_REPACK on against off, each side a process of its own, in alternating pairs:
              weights per buffer type, load time, prefill and decode tokens/s, on the bundled Q4_1 and
              a Q4_0 made from it (the quant llama.cpp repacks). Runs only when named.
10. `hub`     the API's pub/sub client (`api/hub.py`) against redis-py's own asyncio PubSub, each in a
              subscriber process of its own at 100 and 1,000 channels, in alternating pairs: events/s flat
              out, subscriber CPU per 1,000 events, latency p50/p99 at a fixed rate. Runs only when named.

Every scenario starts its own Redis and processes and stops them at its
end; progress goes to stderr; the figures go to a JSON file, Markdown
tables in docs/benchmarks.md and a PNG chart. `--quick` runs tiny sizes
(seconds): the test suite's smoke run, so the benchmark itself does not rot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenfan.bench.batch import Plan

SCENARIOS = ("relay", "capacity", "ttft", "e2e", "server", "batch", "chaos", "versus", "repack", "hub")
# What a run with no scenario named runs: the soak takes ten minutes and measures no speed.
DEFAULT_SCENARIOS = SCENARIOS[:6]
ALIASES = {str(i): name for i, name in enumerate(SCENARIOS, start=1)}
DEFAULT_OUT = "docs/benchmarks.md"
DEFAULT_JSON = "docs/benchmarks/results.json"
DEFAULT_CHART = "docs/benchmarks/latency.png"
# Context size of both model sides: the worker's default.
N_CTX = 2048


@dataclass(frozen=True)
class Sizes:
    relay_levels: tuple[tuple[int, float, float], ...]  # (streams, tokens/s per stream, seconds)
    capacity_streams: int
    capacity_offered: tuple[float, ...]  # aggregate events/s per step; 0: publishers flat out
    capacity_seconds: float
    idle_levels: tuple[int, ...]
    idle_hold_s: float
    burst_at: int  # streams of the burst proof (0: none)
    ttft_requests: int
    ttft_gap_s: float
    e2e_tokens: int
    e2e_rounds: int
    e2e_all_cpus_too: bool  # also compare both sides with llama.cpp on every CPU (shared with the relay)
    server_tokens: int
    server_levels: tuple[int, ...]
    server_requests_per_level: int
    server_no_interrupt: bool
    batch_tokens: int
    batch_levels: tuple[int, ...]
    batch_slots: int  # tokenfan's --slots and llama-server's --parallel
    batch_requests: int  # requests per cell, at least (and two per client)
    batch_rounds: int
    batch_all_cpus_too: bool  # also at every CPU (the 2 threads here), not only at --threads


# A full run takes about ten minutes on two cores, plus about six for `batch` (and, the first time, the
# llama-server build: about 23 CPU-minutes).
FULL = Sizes(
    # 1,000 streams at 50 tokens/s would be 50,000 events/s, past one API process's
    # capacity (scenario 2): at 1,000 streams the per-stream rate is lowered instead.
    relay_levels=((1, 50.0, 20.0), (10, 50.0, 10.0), (100, 50.0, 10.0), (1000, 5.0, 10.0), (1000, 10.0, 10.0)),
    capacity_streams=200,
    capacity_offered=(5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 0),
    capacity_seconds=6.0,
    idle_levels=(1000, 2000, 4000, 8000),
    idle_hold_s=2.0,
    burst_at=2000,
    ttft_requests=100,
    ttft_gap_s=0.1,
    e2e_tokens=256,
    e2e_rounds=7,
    e2e_all_cpus_too=True,
    server_tokens=128,
    server_levels=(1, 4, 16),
    server_requests_per_level=8,
    server_no_interrupt=True,
    # The figures: 16 concurrent streams of 64 tokens.
    batch_tokens=64,
    batch_levels=(1, 4, 16),
    batch_slots=16,
    batch_requests=16,
    batch_rounds=3,
    batch_all_cpus_too=True,
)
QUICK = Sizes(
    relay_levels=((1, 50.0, 1.0), (10, 50.0, 1.0)),
    capacity_streams=10,
    capacity_offered=(500, 1000),
    capacity_seconds=1.0,
    idle_levels=(20,),
    idle_hold_s=0.2,
    burst_at=20,
    ttft_requests=5,
    ttft_gap_s=0.05,
    e2e_tokens=8,
    e2e_rounds=1,
    e2e_all_cpus_too=False,
    server_tokens=4,
    server_levels=(1, 2),
    server_requests_per_level=2,
    server_no_interrupt=False,
    batch_tokens=4,
    batch_levels=(1, 2),
    batch_slots=2,
    batch_requests=2,
    batch_rounds=1,
    batch_all_cpus_too=False,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure relay overhead, capacity, TTFT and end-to-end speed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="*", default=[],
                   help="relay, capacity, ttft, e2e, server, batch (or 1-6); default: all six")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds per scenario (the smoke test)")
    p.add_argument("--out", default=DEFAULT_OUT, help="Markdown file for the tables (default %(default)s)")
    p.add_argument("--json", default=DEFAULT_JSON, help="JSON results (default %(default)s)")
    p.add_argument("--chart", default=DEFAULT_CHART, help="PNG chart (default %(default)s)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="llama.cpp threads on every model side (default: llama-cpp-python's own default, "
                        "half the CPUs: %(default)s)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the API process to a CPU of its own")
    chaos = p.add_argument_group("chaos")
    chaos.add_argument("--duration", type=float, help="chaos: seconds of soak (default 600; --quick 40)")
    chaos.add_argument("--streams", type=int, help="chaos: concurrent clients (default 50; --quick 8)")
    chaos.add_argument("--seed", type=int, default=1, help="chaos: seed of the faults and the clients (default 1)")
    chaos.add_argument("--faults", help="chaos: comma-separated kinds of fault (default: all of "
                       "worker-kill, worker-term, api-kill, api-term, redis-restart)")
    vs = p.add_argument_group("versus")
    vs.add_argument("--against", type=Path, help="versus: a checkout of the commit to compare with (its root)")
    vs.add_argument("--pairs", type=int, help="versus, repack, hub: alternating pairs of runs (default 3; --quick 1)")


def default_threads() -> int:
    """llama-cpp-python's own default (`Llama(n_threads=None)`, `llama_cpp.server`): half the logical
    CPUs, the physical cores on most machines. It leaves room for the rest of the machine, which is
    where tokenfan's relay runs when the model is on the same CPUs."""
    return max((os.cpu_count() or 1) // 2, 1)


def scenarios_of(given: list[str]) -> list[str]:
    names = [ALIASES.get(g, g) for g in given] or list(DEFAULT_SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"tokenfan bench: unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return list(dict.fromkeys(names))


def command_of(args: argparse.Namespace) -> list[str]:
    """The flags that made this run, for the record (defaults left out)."""
    out = list(args.scenario)
    if args.quick:
        out.append("--quick")
    for flag, default in (("out", DEFAULT_OUT), ("json", DEFAULT_JSON), ("chart", DEFAULT_CHART)):
        if getattr(args, flag) != default:
            out += [f"--{flag}", getattr(args, flag)]
    if args.threads != default_threads():
        out += ["--threads", str(args.threads)]
    if args.no_pin:
        out.append("--no-pin")
    for flag in ("duration", "streams", "faults", "against", "pairs"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    if args.seed != 1:
        out += ["--seed", str(args.seed)]
    return out


def run(args: argparse.Namespace) -> int:
    from tokenfan.bench import report as report
    from tokenfan.bench.procs import BenchError, Layout, Stack, progress

    names = scenarios_of(args.scenario)
    if "versus" in names and args.against is None:
        raise SystemExit("tokenfan bench: versus needs --against DIR, a checkout of the commit to compare with")
    sizes = QUICK if args.quick else FULL
    layout = Layout() if args.no_pin else Layout.detect()
    command = report.command_line(command_of(args))
    info = report.machine()
    progress(f"{command}: {', '.join(names)}; {layout.describe()}")
    entries: dict[str, dict[str, Any]] = {}
    failed = []
    run_started = _now()
    for name in names:
        started, t0, load_before = _now(), time.monotonic(), _loadavg()
        progress(f"scenario {name}: starting (load average {load_before})")
        try:
            with Stack(layout) as stack:
                result = RUNNERS[name](stack, sizes, args)
        except BenchError as exc:
            progress(f"scenario {name} FAILED: {exc}")
            failed.append(name)
            continue
        seconds = round(time.monotonic() - t0, 1)
        progress(f"scenario {name}: done in {seconds}s")
        entries[name] = {"command": command, "run_started": run_started, "started": started, "seconds": seconds,
                         "quick": args.quick, "load_average": [load_before, _loadavg()],
                         "machine": {**info, "pinning": layout.describe()}, "result": result}
    if entries:
        _write(args, entries)
    return 1 if failed else 0


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _loadavg() -> float:
    """The 1-minute load average (other work on the machine shows up here)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0


def _write(args: argparse.Namespace, entries: dict[str, dict[str, Any]]) -> None:
    from tokenfan.bench import report as report
    from tokenfan.bench.procs import progress

    doc = report.merge_json(Path(args.json), entries)
    chart = Path(args.chart)
    drawn = report.draw_chart(chart, doc)
    report.write_markdown(Path(args.out), doc, chart if drawn else None)
    progress(f"wrote {args.json}, {args.out}" + (f", {args.chart}" if drawn else ""))


def _relay(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.relay import relay_overhead

    return relay_overhead(stack, list(sizes.relay_levels))


def _capacity(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.relay import capacity

    return capacity(stack, sizes.capacity_streams, list(sizes.capacity_offered), sizes.capacity_seconds,
                    list(sizes.idle_levels), sizes.idle_hold_s, sizes.burst_at)


def _ttft(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.model import ttft_overhead

    return ttft_overhead(stack, sizes.ttft_requests, sizes.ttft_gap_s)


def _e2e(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.model import end_to_end

    every = os.cpu_count() or 1
    counts = [args.threads] + ([every] if sizes.e2e_all_cpus_too and every > args.threads else [])
    return end_to_end(stack, counts, N_CTX, sizes.e2e_tokens, sizes.e2e_rounds)


def _server(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.model import versus_server

    return versus_server(stack, args.threads, N_CTX, sizes.server_tokens, list(sizes.server_levels),
                         sizes.server_requests_per_level, sizes.server_no_interrupt)


def _batch(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.batch import batch_versus_server

    every = os.cpu_count() or 1
    counts = [args.threads] + ([every] if sizes.batch_all_cpus_too and every > args.threads else [])
    return batch_versus_server(stack, counts, batch_plan(sizes))


def batch_plan(sizes: Sizes) -> Plan:
    """Scenario 6's sizes as its own `Plan` (the smoke test runs it with them too)."""
    from tokenfan.bench.batch import Plan

    return Plan(N_CTX, sizes.batch_slots, sizes.batch_tokens, sizes.batch_levels, sizes.batch_requests,
                sizes.batch_rounds)


def _chaos(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.chaos import default_plan, soak

    return soak(stack, default_plan(args.duration, args.streams, args.seed, args.faults, args.quick))


def _versus(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.versus import plan, versus

    return versus(stack, args.against, plan(args.quick, args.pairs))


def _repack(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.repack import repack_cost

    pairs = args.pairs or (1 if args.quick else 3)
    return repack_cost(args.threads, pairs, 8 if args.quick else 64)


def _hub(stack: Any, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from tokenfan.bench.pubsub import hub_versus_redis_py, plan

    return hub_versus_redis_py(stack, plan(args.quick, args.pairs))


RUNNERS: dict[str, Callable[[Any, Sizes, argparse.Namespace], dict[str, Any]]] = {
    "relay": _relay, "capacity": _capacity, "ttft": _ttft, "e2e": _e2e, "server": _server, "batch": _batch,
    "chaos": _chaos, "versus": _versus, "repack": _repack, "hub": _hub,
}


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenfan.bench.main …`, the same as `tokenfan bench …`."""
    parser = argparse.ArgumentParser(prog="tokenfan")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
