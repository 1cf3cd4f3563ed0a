"""llama.cpp's CPU weight repacking and AMX buffers: whether a worker uses them.

llama.cpp's CPU backend loads weights into "extra buffer types" where it has
kernels for them: CPU_REPACK (weights re-laid out for the AVX2, AVX-512 or
NEON matrix kernels) and AMX (Intel's tile units, Sapphire Rapids and later).
One model parameter, `use_extra_bufts`, turns them on or off together.

pip builds llama-cpp-python for the CPU it builds on (`-march=native`), so on
a CPU with AMX the build has ggml's AMX kernels, and they crash in the first
`llama_decode` (llama.cpp#20824; ollama and dspy's CI hit it on Sapphire
Rapids). The same build answers with extra buffers off. So `auto`, the
default, turns them off where the CPU has AMX and the build has AMX kernels,
and leaves them on everywhere else (AVX2, AVX-512 without AMX, ARM), where
they are what llama.cpp does by default. `docs/benchmarks.md` measures what
`off` costs on a build without AMX.

The decision takes the CPU's flags and llama.cpp's own system-info line as
arguments, so it is tested on recorded flag sets of each kind of CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Repack = Literal["auto", "on", "off"]
CPUINFO = Path("/proc/cpuinfo")
# The /proc/cpuinfo flags of Intel's AMX units (Linux names them so).
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# The features logged at start: what decides the matrix kernels llama.cpp runs.
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
               "asimd", "sve", "i8mm")


@dataclass(frozen=True)
class RepackChoice:
    extra_bufts: bool
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo's text (x86 `flags`, ARM `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags() -> frozenset[str]:
    try:
        return cpu_flags(CPUINFO.read_text(errors="replace"))
    except OSError:  # not Linux: nothing known, nothing turned off
        return frozenset()


def build_has_amx(system_info: str) -> bool:
    """Whether llama.cpp was built with its AMX kernels, from `llama_print_system_info()`."""
    return re.search(r"\bAMX_INT8 = 1\b", system_info) is not None


def choose(mode: Repack, flags: frozenset[str], system_info: str) -> RepackChoice:
    """Extra buffer types on or off, and why, in words for the start-up log."""
    if mode == "on":
        return RepackChoice(True, "on (TOKENFAN_CPU_REPACK=on)")
    if mode == "off":
        return RepackChoice(False, "off (TOKENFAN_CPU_REPACK=off)")
    if flags & AMX_FLAGS and build_has_amx(system_info):
        return RepackChoice(False, "off: this CPU has AMX and llama.cpp was built with its AMX kernels, which crash "
                            "(llama.cpp#20824); TOKENFAN_CPU_REPACK=on forces them")
    return RepackChoice(True, "on (llama.cpp's default; no AMX kernels in play)")


def shown(flags: frozenset[str]) -> str:
    """The features that decide llama.cpp's kernels, for the log."""
    return " ".join(f for f in SHOWN_FLAGS if f in flags) or "none of " + ",".join(SHOWN_FLAGS[:3])
