"""Scenario 9, `repack`: what TOKENFAN_CPU_REPACK costs, `on` and `off` side by side on this CPU.

`auto` turns llama.cpp's extra buffer types (CPU weight repacking and AMX) off only where the CPU has AMX
and the build has AMX kernels (worker/cpu.py); everywhere else it is `on`. This measures what `off` would
cost a CPU without AMX, and shows what `on` does to one with it (a side that crashes is reported as such).

Each side is a process of its own (`python -m tokenfan.bench.repack MODEL on|off THREADS`), as is the
quantizer (`... quantize SOURCE OUT`), so a crash
ends that side, not the run, and neither side inherits the other's page cache warmth more than the file's.
A side loads the model into the worker's own batch engine, then measures prefill (one long prompt) and
decode (four streams at once, end-of-text biased away so every stream decodes its full length).

The models: the bundled Q4_1 (llama.cpp does not repack Q4_1: the control, both sides must match) and a
Q4_0 made from it by llama.cpp's own quantizer (`llama_model_quantize`, allow_requantize), which the CPU
backend repacks for AVX2, AVX-512 and NEON. Pairs alternate which side runs first; ratios are per pair.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tokenfan.bench.procs import BenchError, progress
from tokenfan.bench.stats import alternating_pairs

SLOTS = 4
N_CTX = 2048
# About 460 prompt tokens: two of the engine's 256-token prefill chunks.
PROMPT_WORDS = 160
CHILD_TIMEOUT_S = 600
# LLAMA_FTYPE_MOSTLY_Q4_0 in llama.h.
FTYPE_Q4_0 = 2


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tokenfan" / "bench"


def q4_0_model(source: Path) -> Path:
    """The bundled model requantized to Q4_0 (once; kept in the cache), in a process of its own: the
    quantizer shares llama.cpp's process-wide state with whatever else the caller runs on llama.cpp
    (a test process's engines, their threads), and a crash there must end this step, not the caller."""
    out = cache_dir() / f"{source.stem}.requant-Q4_0.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    argv = [sys.executable, "-m", "tokenfan.bench.repack", "quantize", str(source), str(tmp)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise BenchError(f"llama_model_quantize could not make a Q4_0 of {source} (exit {done.returncode}): "
                         f"{done.stderr[-400:]}")
    tmp.rename(out)
    return out


def _quantize(source: Path, out: Path) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPE_Q4_0
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    return int(llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params))


def _side(model: Path, setting: str, threads: int, tokens: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "tokenfan.bench.repack", str(model), setting, str(threads), str(tokens)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        how = signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit code {done.returncode}"
        return {"setting": setting, "crashed": how, "stderr": done.stderr[-400:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def repack_cost(threads: int, pairs: int, tokens: int) -> dict[str, Any]:
    from tokenfan.shared.settings import WorkerSettings
    from tokenfan.worker.cpu import read_cpu_flags, shown
    from tokenfan.worker.engines import model_file

    bundled = model_file(WorkerSettings())
    models = [bundled, q4_0_model(bundled)]
    rows = []
    for model in models:

        def one(setting: str, i: int, model: Path = model) -> dict[str, Any]:
            progress(f"repack: {model.name} {setting} (pair {i + 1} of {pairs})")
            return _side(model, setting, threads, tokens)

        sides = alternating_pairs(("on", "off"), pairs, one)
        rows.append({"model": model.name, "on": sides["on"], "off": sides["off"], "ratios": _ratios(sides)})
    return {"threads": threads, "pairs": pairs, "tokens": tokens, "cpu_features": shown(read_cpu_flags()),
            "models": rows}


def _ratios(sides: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """Median over pairs of off/on, per figure (None when a side crashed)."""
    out: dict[str, float | None] = {}
    for key in ("prefill_tps", "decode_tps"):
        pairs = [(off[key], on[key]) for on, off in zip(sides["on"], sides["off"], strict=True)
                 if key in on and key in off]
        out[key] = round(statistics.median(o / n for o, n in pairs), 3) if pairs else None
    return out


def repack_table(r: dict[str, Any]) -> list[str]:
    lines = [f"CPU features: {r['cpu_features']}; {r['threads']} threads, {SLOTS} streams of {r['tokens']} tokens, "
             f"{r['pairs']} alternating pairs; medians.", "",
             "| model | setting | weights by buffer type (MiB) | load s | prefill tokens/s | decode tokens/s |",
             "|---|---|---|---:|---:|---:|"]
    for row in r["models"]:
        for setting in ("on", "off"):
            lines.append(_row(row["model"], setting, row[setting]))
        ratio = row["ratios"]
        lines.append(f"| {row['model']} | off / on | | | {_x(ratio['prefill_tps'])} | {_x(ratio['decode_tps'])} |")
    return lines


def _row(model: str, setting: str, runs: list[dict[str, Any]]) -> str:
    ok = [x for x in runs if "crashed" not in x]
    if not ok:
        return f"| {model} | {setting} | crashed ({runs[0]['crashed']}) | | | |"
    bufs = ", ".join(f"{k} {v:.1f}" for k, v in ok[0]["buffers"].items())

    def med(key: str) -> str:
        return f"{statistics.median(x[key] for x in ok):.1f}"

    return f"| {model} | {setting} | {bufs} | {med('load_s')} | {med('prefill_tps')} | {med('decode_tps')} |"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# --- one side, in its own process ---------------------------------------------------------------

def _measure(model: Path, setting: str, threads: int, tokens: int) -> dict[str, Any]:
    from tokenfan.worker.batch import LlamaBatchEngine
    from tokenfan.worker.engines import GenRequest

    t0 = time.perf_counter()
    engine = LlamaBatchEngine(model, n_ctx=N_CTX, slots=SLOTS, threads=threads, n_gpu_layers=0,
                              repack=setting)  # type: ignore[arg-type]
    load_s = time.perf_counter() - t0
    ll = engine.ll
    ends = {int(ll.llama_vocab_eos(engine.vocab)), int(ll.llama_vocab_eot(engine.vocab))} - {-1}
    words = " ".join(f"word{i % 50}" for i in range(PROMPT_WORDS))
    long = GenRequest(messages=[{"role": "user", "content": words}], max_tokens=1, temperature=0.0)
    prompt_tokens = engine.prompt_tokens(long)
    t1 = time.perf_counter()
    engine.admit("prefill", long)
    while engine.active():
        engine.step()
    prefill_s = time.perf_counter() - t1
    for i in range(SLOTS):
        engine.admit(f"s{i}", GenRequest(messages=[{"role": "user", "content": f"Tell a story number {i}."}],
                                         max_tokens=tokens, temperature=0.0, logit_bias=dict.fromkeys(ends, -100.0)))
    decoded, seconds = 0, 0.0
    while engine.active():
        engine.step()
        if engine.last.prefill == 0:
            decoded += engine.last.decode
            seconds += engine.last.seconds
    buffers = engine.llama_log.buffers()
    engine.close()
    return {"setting": setting, "load_s": round(load_s, 3), "buffers": buffers, "prompt_tokens": prompt_tokens,
            "prefill_tps": round(prompt_tokens / prefill_s, 1), "decode_tps": round(decoded / seconds, 1),
            "decoded": decoded}


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        sys.exit(_quantize(Path(sys.argv[2]), Path(sys.argv[3])))
    model_arg, setting_arg, threads_arg, tokens_arg = sys.argv[1:5]
    print(json.dumps(_measure(Path(model_arg), setting_arg, int(threads_arg), int(tokens_arg))))
