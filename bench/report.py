"""Writing a benchmark run down: JSON, the Markdown tables, the chart.

The JSON file keeps the latest result of every scenario with the command,
time and machine that made it, so running one scenario again updates only
its own part. The Markdown tables go between two marker comments in the
document (the prose around them is left as it is); a document without the
markers gets them appended.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import psutil

BEGIN = "<!-- tokenfan bench: generated tables begin (edit the prose outside these markers) -->"
END = "<!-- tokenfan bench: generated tables end -->"
TITLES = {
    "relay": "1. Relay overhead per token",
    "capacity": "2. Relay capacity of one API process",
    "ttft": "3. Time to first token overhead",
    "e2e": "4. End to end with the real model",
    "server": "5. Against llama-cpp-python's OpenAI server",
    "batch": "6. Batching: one worker's slots against llama.cpp's llama-server",
    "chaos": "7. Chaos soak: workers, API processes and Redis killed under load",
    "versus": "8. This API against another commit's, side by side",
    "repack": "9. CPU weight repacking on and off (TOKENFAN_CPU_REPACK)",
    "hub": "10. The API's pub/sub client against redis-py's own",
}


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.system() + " " + platform.release(),
        "python": platform.python_version(),
        "llama_cpp_python": _version("llama_cpp_python"),
        "redis_py": _version("redis"),
        "commit": _commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def command_line(argv: list[str]) -> str:
    """The command as typed, with any absolute path shortened (no machine's path goes into a file)."""
    return " ".join(["tokenfan", "bench", *(_short(a) for a in argv)])


def _short(arg: str) -> str:
    if not os.path.isabs(arg):
        return arg
    try:
        rel = os.path.relpath(arg)
    except ValueError:
        rel = ""
    return rel if rel and not rel.startswith("..") else Path(arg).name


# --- JSON -----------------------------------------------------------------

def merge_json(path: Path, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"tool": "tokenfan bench", "scenarios": {}}
    if path.is_file():
        try:
            old = orjson.loads(path.read_bytes())
            if isinstance(old, dict) and isinstance(old.get("scenarios"), dict):
                doc["scenarios"] = old["scenarios"]
        except orjson.JSONDecodeError:
            pass
    doc["scenarios"].update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return doc


# --- Markdown ---------------------------------------------------------------

def write_markdown(path: Path, doc: dict[str, Any], chart: Path | None) -> None:
    section = render(doc, _rel(chart, path.parent) if chart else None)
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    block = f"{BEGIN}\n{section}\n{END}"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _rel(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:
        return target.name


def render(doc: dict[str, Any], chart: str | None) -> str:
    scenarios = doc["scenarios"]
    out = [_provenance(scenarios), "", "### Targets", "", "| scenario | what | target | measured | met |",
           "|---|---|---|---|---|"]
    for name in TITLES:
        entry = scenarios.get(name)
        for t in (entry or {}).get("result", {}).get("targets", []):
            met = "yes" if t["met"] else "**no**"
            out.append(f"| {name} | {t['what']} | {t['target']} | {t['value']} | {met} |")
    for name, title in TITLES.items():
        entry = scenarios.get(name)
        if entry:
            out += ["", f"### {title}", "", *TABLES[name](entry["result"])]
    if chart:
        out += ["", f"![relay latency percentiles against concurrency, and capacity]({chart})"]
    return "\n".join(out)


def _provenance(scenarios: dict[str, Any]) -> str:
    runs: dict[tuple[str, str, str], list[str]] = {}
    for name in TITLES:
        if name in scenarios:
            e = scenarios[name]
            key = (e["command"], e.get("run_started", e["started"]), e["machine"].get("commit") or "unknown")
            runs.setdefault(key, []).append(f"{name} ({e['seconds']:g} s, load average {_loads(e)})")
    lines = [f"- `{cmd}`, started {started}, tokenfan commit {commit}: {', '.join(names)}"
             for (cmd, started, commit), names in runs.items()]
    m = next(iter(scenarios.values()))["machine"] if scenarios else {}
    lines.append(f"- machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('memory_gib')} GiB, {m.get('os')}, "
                 f"Python {m.get('python')}, llama-cpp-python {m.get('llama_cpp_python')}, "
                 f"redis-py {m.get('redis_py')}; {m.get('pinning', '')}")
    if any(e.get("quick") for e in scenarios.values()):
        lines.append("- **quick sizes** (`--quick`): a smoke run; its figures say nothing about the targets")
    return "\n".join(lines)


def _loads(entry: dict[str, Any]) -> str:
    before, after = (entry.get("load_average") or [None, None])[:2]
    return f"{before} → {after}"


def _ms(s: dict[str, Any], key: str) -> str:
    v = s.get(key)
    return "-" if v is None else f"{v:g}"


def _load(row: dict[str, Any]) -> str:
    pct = row.get("load_cpu_pct")
    if pct is None:
        return "-"
    return f"{pct} (bound)" if row.get("generator_bound") else f"{pct}"


def _relay_table(r: dict[str, Any]) -> list[str]:
    rows = ["| streams | tokens/s per stream | events/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
            "| received / published | failed | API CPU % | client+publisher+Redis CPU % "
            "| floor p50 / p99 ms (Redis direct) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in r["levels"]:
        lag, floor = lv["lag_ms"], (lv.get("floor") or {}).get("lag_ms", {})
        rows.append(f"| {lv['streams']:,} | {lv['rate_per_stream']:g} | {lv['published_per_s']:,.0f} "
                    f"| {_ms(lag, 'p50')} | {_ms(lag, 'p90')} | {_ms(lag, 'p99')} | {_ms(lag, 'p99_9')} "
                    f"| {_ms(lag, 'max')} | {lv['tokens_received']:,} / {lv['tokens_published']:,} | {lv['failed']} "
                    f"| {lv['api_cpu_pct']} | {_load(lv)} | {_ms(floor, 'p50')} / {_ms(floor, 'p99')} |")
    return rows


def _capacity_table(r: dict[str, Any]) -> list[str]:
    rows = ["Throughput ramp (token events delivered to SSE clients while the publishers ran):", "",
            "| streams | offered events/s | published events/s | delivered events/s | API CPU % "
            "| delivered per API CPU-second | client+publisher+Redis CPU % | lag p50 ms | lag p99 ms | failed |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["throughput"]:
        per_core = s["delivered_in_window_per_s"] / (s["api_cpu_pct"] / 100) if s["api_cpu_pct"] else 0
        offered = f"{s['offered_per_s']:,.0f}" if s["offered_per_s"] else "flat out"
        rows.append(f"| {s['streams']:,} | {offered} | {s['published_per_s']:,.0f} "
                    f"| {s['delivered_in_window_per_s']:,.0f} | {s['api_cpu_pct']} | {per_core:,.0f} | {_load(s)} "
                    f"| {_ms(s['lag_ms'], 'p50')} | {_ms(s['lag_ms'], 'p99')} | {s['failed']} |")
    rows += ["", "Idle streams on a fresh API process: RSS before they connect and once all have connected; "
             "then, after the hold, one token per stream (staggered over a second, or all at once: burst) "
             "and `done`:", "",
             "| streams | kind | connected | finished | failed | RSS before MiB | RSS after MiB | KB per idle stream "
             "| held |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in r["idle"]:
        rows.append(f"| {s['streams']:,} | {s.get('kind', 'staggered')} | {s['connected']:,} | {s['finished']:,} "
                    f"| {s['failed']} | {s['rss_before'] / 2**20:.0f} | {s['rss_after'] / 2**20:.0f} "
                    f"| {s['kb_per_stream']} | {'yes' if s['held'] else '**no**'} |")
    return rows


def _ttft_table(r: dict[str, Any]) -> list[str]:
    rows = [f"{r['requests']} sequential requests per route, fake engine, idle warm worker (all in ms):", "",
            "| route | overhead p50 | overhead p95 | request → first token p50 | engine TTFT p50 "
            "| queue wait p50 | up to the worker's publish p50 | relay p50 | failed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["routes"].items():
        rows.append(f"| {name} | {_ms(s['overhead_ms'], 'p50')} | {_ms(s['overhead_ms'], 'p95')} "
                    f"| {_ms(s['total_ms'], 'p50')} | {_ms(s['engine_ttft_ms'], 'p50')} "
                    f"| {_ms(s['queue_wait_ms'], 'p50')} | {_ms(s['to_publish_ms'], 'p50')} "
                    f"| {_ms(s['relay_ms'], 'p50')} | {s['failed']} |")
    return rows


def _e2e_table(r: dict[str, Any]) -> list[str]:
    rows = [f"One stream, {r['max_tokens']} tokens at most, temperature 0, {r['rounds']} alternating rounds "
            "(medians; the ratio is the median of each round's tokenfan/direct ratio):", "",
            "| threads | side | decode tokens/s | end-to-end tokens/s | TTFT ms | tokens | failed "
            "| tokenfan / direct | rounds' ratios % | same text |",
            "|---:|---|---:|---:|---:|---|---:|---:|---|---|"]
    for run in r["runs"]:
        for side in ("direct", "tokenfan"):
            s = run[side]
            extra = (f"**{run['ratio_pct']} %** | {', '.join(map(str, run['round_ratios_pct']))} "
                     f"| {'yes' if run['same_text'] else 'no'}") if side == "tokenfan" else " | | "
            rows.append(f"| {run['threads']} | {side} | {s['decode_tokens_per_s']} | {s['e2e_tokens_per_s']} "
                        f"| {s['ttft_ms']} | {', '.join(map(str, s['tokens']))} | {s['failed']} | {extra} |")
    if any(run[side].get("per_token_us") for run in r["runs"] for side in ("direct", "tokenfan")):
        rows += ["", "Where a token's time went (µs per token, medians of the rounds; Linux schedstat for the "
                 "processes, the client's own thread time): the model's threads' CPU and their wait, runnable, "
                 "for a CPU that another process had; the CPU of the API, Redis and the client.", "",
                 "| threads | side | token interval µs | model threads' CPU | model threads' wait for a CPU "
                 "| API CPU | Redis CPU | client CPU |",
                 "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for run in r["runs"]:
            for side in ("direct", "tokenfan"):
                s = run[side]
                u = s.get("per_token_us", {})
                interval = round(1e6 / s["decode_tokens_per_s"]) if s["decode_tokens_per_s"] else "-"
                rows.append(f"| {run['threads']} | {side} | {interval} | {u.get('model_cpu_us', '-')} "
                            f"| {u.get('model_wait_us', '-')} | {u.get('api_cpu_us', '-')} "
                            f"| {u.get('redis_cpu_us', '-')} | {u.get('client_cpu_us', '-')} |")
    return rows


def _server_table(r: dict[str, Any]) -> list[str]:
    threads = f"{r['threads']} thread" + ("" if r["threads"] == 1 else "s")
    rows = [f"One model instance per side ({threads}), {r['max_tokens']} tokens at most, "
            "temperature 0, the same client code on the OpenAI route:", "",
            "| clients | side | requests | got a first token | TTFT p50 ms | TTFT p95 ms | tokens "
            "| aggregate tokens/s | completed | interrupted | failed |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["rows"]:
        rows.append(f"| {s['clients']} | {s['side']} | {s['requests']} | {s.get('first_tokens', '-')} "
                    f"| {_ms(s['ttft_ms'], 'p50')} | {_ms(s['ttft_ms'], 'p95')} | {s['tokens']:,} "
                    f"| {s['tokens_per_s']} | {s['completed']} "
                    f"| {s['interrupted']} | {s['failed']} |")
    return rows


def _batch_table(r: dict[str, Any]) -> list[str]:
    from tokenfan.bench.batch import batch_table

    return batch_table(r)


def _versus_table(r: dict[str, Any]) -> list[str]:
    from tokenfan.bench.versus import versus_table

    return versus_table(r)


def _repack_table(r: dict[str, Any]) -> list[str]:
    from tokenfan.bench.repack import repack_table

    return repack_table(r)


def _hub_table(r: dict[str, Any]) -> list[str]:
    from tokenfan.bench.pubsub import hub_table

    return hub_table(r)


def _chaos_table(r: dict[str, Any]) -> list[str]:
    from tokenfan.bench.chaos import chaos_table

    return chaos_table(r)


TABLES = {"relay": _relay_table, "capacity": _capacity_table, "ttft": _ttft_table, "e2e": _e2e_table,
          "server": _server_table, "batch": _batch_table, "chaos": _chaos_table,
          "versus": _versus_table, "repack": _repack_table, "hub": _hub_table}


# --- the chart --------------------------------------------------------------

def draw_chart(path: Path, doc: dict[str, Any]) -> bool:
    """Relay latency percentiles against concurrency (and capacity when measured); False: nothing to draw."""
    relay = doc["scenarios"].get("relay", {}).get("result")
    cap = doc["scenarios"].get("capacity", {}).get("result")
    if not relay and not cap:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (relay, cap) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    i = 0
    if relay:
        _relay_panel(axes[0][i], relay)
        i += 1
    if cap:
        _capacity_panel(axes[0][i], cap)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _relay_panel(ax: Any, relay: dict[str, Any]) -> None:
    levels = relay["levels"]
    x = list(range(len(levels)))
    for key, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-"), ("p99_9", "v:")):
        ax.plot(x, [max(lv["lag_ms"].get(key, 0), 1e-3) for lv in levels], style, label=key.replace("_", "."))
    floor = [lv.get("floor", {}).get("lag_ms", {}) for lv in levels]
    if any(floor):
        ax.plot(x, [max(f.get("p50", 0), 1e-3) for f in floor], "o--", color="grey", label="floor p50 (Redis direct)")
        ax.plot(x, [max(f.get("p99", 0), 1e-3) for f in floor], "^--", color="silver", label="floor p99")
    ax.set_xticks(x, [f"{lv['streams']:,}\nx {lv['rate_per_stream']:g}/s\n={lv['published_per_s']:,.0f}/s"
                      for lv in levels], fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="green", lw=0.6, ls=":")
    ax.axhline(5.0, color="red", lw=0.6, ls=":")
    ax.set_xlabel("concurrent streams x tokens/s each = events/s")
    ax.set_ylabel("worker publish → client receipt (ms)")
    ax.set_title("Relay overhead per token event")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _capacity_panel(ax: Any, cap: dict[str, Any]) -> None:
    steps = cap["throughput"]
    pub = [s["published_per_s"] for s in steps]
    ax.plot(pub, [s["delivered_in_window_per_s"] for s in steps], "o-", label="delivered events/s")
    ax.plot(pub, pub, ":", color="grey", label="published events/s")
    ax.set_xlabel("published token events/s (all streams)")
    ax.set_ylabel("events/s")
    ax.set_title("Capacity of one API process (one CPU)")
    ax2 = ax.twinx()
    ax2.plot(pub, [max(s["lag_ms"].get("p50", 0), 1e-3) for s in steps], "s--", color="tab:orange", label="lag p50")
    ax2.plot(pub, [max(s["lag_ms"].get("p99", 0), 1e-3) for s in steps], "^--", color="tab:red", label="lag p99")
    ax2.set_yscale("log")
    ax2.set_ylabel("lag (ms)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
