"""Scenario 8, `versus`: this checkout's API process against another commit's, side by side in one run.

The relay's figures move by 2x across a session on a shared machine, so a
change is judged only against its parent measured minutes apart: `--against
DIR` names a checkout of the other commit (`git worktree add DIR <commit>`,
or `git archive <commit> | tar -x -C DIR`), whose root goes first on the
API process's PYTHONPATH. Everything else (Redis, the publishers playing the
workers, the client) is this checkout's, so only the API differs.

Each pair runs both APIs, in turn, through the same three runs, the order
swapped every pair: 100 streams at 50 tokens/s (relay p50 and p99, API CPU
per event), 200 streams with two publishers flat out (events/s delivered,
CPU per event), and a held ladder rung of idle streams (memory per stream).
The medians over the pairs are compared; so are the single pairs.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfan.bench.procs import BenchError, Stack, child_env, progress
from tokenfan.bench.relay import API_ENV, RelayPlan, idle_level, relay_run, warm_up
from tokenfan.bench.stats import alternating_pairs, pair_cells, side_medians

SIDES = ("baseline", "this")
# A checkout's tiers after the layout change (issue 15), installed as tokenfan.<tier>.
TIERS = ("shared", "api", "worker", "ops")
# The figures compared: (key, what, unit, True where more is better).
FIGURES = (
    ("relay_p50_ms", "relay p50", "ms", False),
    ("relay_p99_ms", "relay p99", "ms", False),
    ("relay_cpu_us_per_event", "API CPU per event, relay", "µs", False),
    ("flat_out_per_s", "delivered flat out", "events/s", True),
    ("flat_out_cpu_us_per_event", "API CPU per event, flat out", "µs", False),
    ("idle_kb_per_stream", "memory per idle stream", "KB", False),
)
# The limit issue 15 set: a figure may not be more than this much worse than the baseline's.
WORSE_LIMIT_PCT = 5.0


@dataclass(frozen=True)
class VersusPlan:
    pairs: int
    relay: RelayPlan
    flat_out: RelayPlan
    idle_streams: int
    idle_hold_s: float


def plan(quick: bool, pairs: int | None) -> VersusPlan:
    if quick:
        return VersusPlan(pairs or 1, RelayPlan(10, 50.0, 20), RelayPlan(10, 0.0, 50, 2), 20, 0.2)
    # The figures: 100 streams at 50 tokens/s for 10 s; 200 streams flat out for about 8 s.
    return VersusPlan(pairs or 3, RelayPlan(100, 50.0, 500), RelayPlan(200, 0.0, 1500, 2), 4000, 2.0)


def import_root(path: Path, scratch: Path) -> Path:
    """The folder to put first on the path for the other commit's `tokenfan.*`: its root where the code
    sits under `tokenfan/` (before the layout change), else a folder of links that maps the top-level
    tiers under that name, as the installed package does (after it)."""
    root = path.expanduser().resolve()
    if (root / "tokenfan").is_dir():
        return root
    tiers = [t for t in TIERS if (root / t).is_dir()]
    if not tiers:
        raise BenchError(f"--against {path}: neither tokenfan/ nor {', '.join(TIERS)} there; is it a checkout?")
    shim = scratch / "against" / "tokenfan"
    shim.mkdir(parents=True, exist_ok=True)
    for tier in tiers:
        (shim / tier).symlink_to(root / tier, target_is_directory=True)
    return shim.parent


def check_checkout(path: Path, scratch: Path) -> Path:
    """The path entry for the other commit: one from which tokenfan's API imports from that checkout."""
    root = path.expanduser().resolve()
    entry = import_root(path, scratch)
    env = child_env("redis://127.0.0.1:1", {"PYTHONPATH": str(entry)})
    out = subprocess.run([sys.executable, "-c", "import tokenfan.api.app as a, tokenfan.ops.cli as c; "
                          "print(a.__file__)"], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise BenchError(f"--against {path}: no tokenfan API importable from there "
                         f"({out.stderr.strip().splitlines()[-1:] or ['?']})")
    found = Path(out.stdout.strip()).resolve()
    if root not in found.parents:
        raise BenchError(f"--against {path}: tokenfan's API imports from {found}, not from that checkout")
    return entry


def versus(stack: Stack, against: Path, p: VersusPlan) -> dict[str, Any]:
    root = against.expanduser().resolve()
    paths: dict[str, Path | None] = {"baseline": check_checkout(against, stack.logs), "this": None}

    def one(side: str, i: int) -> dict[str, Any]:
        progress(f"versus: pair {i + 1}/{p.pairs}, {side} API")
        return _one(stack, paths[side], p)

    runs = alternating_pairs(SIDES, p.pairs, one)
    medians = side_medians(runs, (key for key, *_ in FIGURES))
    rows = []
    for key, what, unit, higher_better in FIGURES:
        before, after = medians["baseline"][key], medians["this"][key]
        change = round(100 * (after - before) / before, 1) if before else 0.0
        worse = -change if higher_better else change
        rows.append({"key": key, "what": what, "unit": unit, "baseline": before, "this": after,
                     "change_pct": change, "within_limit": worse <= WORSE_LIMIT_PCT})
    return {"against": str(root), "pairs": p.pairs, "runs": runs, "figures": rows,
            "targets": [{"what": f"{r['what']} against the baseline", "target": f"<= {WORSE_LIMIT_PCT:g} % worse",
                         "value": f"{r['change_pct']:+g} %", "met": r["within_limit"]} for r in rows]}


def _one(stack: Stack, pythonpath: Path | None, p: VersusPlan) -> dict[str, Any]:
    api = stack.api(pinned=True, extra=API_ENV, pythonpath=pythonpath)
    warm_up(stack, api)
    relay = relay_run(stack, api, p.relay)
    flat = relay_run(stack, api, p.flat_out)
    stack.stop(api)
    idle = idle_level(stack, p.idle_streams, p.idle_hold_s, "staggered", pythonpath=pythonpath)
    for name, row in (("relay", relay), ("flat out", flat), ("idle", idle)):
        if row["failed"] or row["tokens_received"] != row["tokens_published"]:
            raise BenchError(f"versus: the {name} run lost events ({row['tokens_received']} of "
                             f"{row['tokens_published']}, {row['failed']} failed)")
    out = {
        "relay_p50_ms": relay["lag_ms"]["p50"], "relay_p99_ms": relay["lag_ms"]["p99"],
        "relay_cpu_us_per_event": _cpu_per_event(relay),
        "flat_out_per_s": flat["delivered_in_window_per_s"], "flat_out_cpu_us_per_event": _cpu_per_event(flat),
        "idle_kb_per_stream": idle["kb_per_stream"],
        "load_cpu_pct": [relay["load_cpu_pct"], flat["load_cpu_pct"]],
    }
    progress(f"  relay p50 {out['relay_p50_ms']} ms p99 {out['relay_p99_ms']} ms, "
             f"{out['relay_cpu_us_per_event']} µs/event; flat out {out['flat_out_per_s']:,.0f}/s, "
             f"{out['flat_out_cpu_us_per_event']} µs/event; idle {out['idle_kb_per_stream']} KB/stream")
    return out


def _cpu_per_event(row: dict[str, Any]) -> float:
    per_s = row["delivered_in_window_per_s"]
    return round(row["api_cpu_pct"] / 100 * 1e6 / per_s, 2) if per_s else 0.0


def versus_table(r: dict[str, Any]) -> list[str]:
    rows = [f"This checkout's API against `{Path(r['against']).name}` (the baseline), {r['pairs']} alternating "
            "pairs, medians:", "",
            "| figure | baseline | this | change | within 5 % |", "|---|---:|---:|---:|---|"]
    for f in r["figures"]:
        rows.append(f"| {f['what']} ({f['unit']}) | {f['baseline']:,} | {f['this']:,} | {f['change_pct']:+g} % "
                    f"| {'yes' if f['within_limit'] else '**no**'} |")
    rows += ["", "Each pair (baseline / this):", "",
             "| pair | " + " | ".join(f"{what}" for _, what, _, _ in FIGURES) + " |",
             "|---:|" + "---:|" * len(FIGURES)]
    for i, (a, b) in enumerate(zip(r["runs"]["baseline"], r["runs"]["this"], strict=True), start=1):
        rows.append(f"| {i} | {pair_cells(a, b, (k for k, *_ in FIGURES))} |")
    return rows
