"""TOKENFAN_CPU_REPACK's `auto` on recorded CPUs: off only where the CPU has AMX and llama.cpp has its AMX kernels."""

from __future__ import annotations

import pytest

from tokenfan.worker import cpu

# The `flags` lines of /proc/cpuinfo, shortened to what matters, as recorded on each kind of machine.
SAPPHIRE_RAPIDS = ("flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 ssse3 fma "
                   "avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile "
                   "amx_int8 avx_vnni\n")
ICE_LAKE = ("flags\t\t: fpu vme de pse tsc msr pae sse sse2 ssse3 fma avx2 avx512f avx512dq avx512cd avx512bw "
            "avx512vl avx512_vnni avx512_bf16\n")
ZEN2 = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 sse sse2 ssse3 fma avx avx2 bmi2 f16c\n"
GRAVITON3 = ("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
             "fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm i8mm bf16\n")

# llama_print_system_info() of a native build on each (the CPU line; other backends may follow).
NATIVE_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | AVX512_VNNI = 1 | "
              "AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")
NATIVE_AVX512 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | "
                 "AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")
AVX2_BUILD = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | REPACK = 1 |"
ARM_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | MATMUL_INT8 = 1 | SVE = 1 | DOTPROD = 1 | REPACK = 1 |"


@pytest.mark.parametrize(("cpuinfo", "info", "on"), [
    (SAPPHIRE_RAPIDS, NATIVE_AMX, False),  # the crash of llama.cpp#20824: turned off
    (SAPPHIRE_RAPIDS, AVX2_BUILD, True),  # a build without AMX kernels on an AMX CPU: nothing crashes
    (ICE_LAKE, NATIVE_AVX512, True),
    (ZEN2, AVX2_BUILD, True),
    (GRAVITON3, ARM_BUILD, True),
    ("", NATIVE_AMX, True),  # nothing known of the CPU (not Linux): llama.cpp's default
], ids=["amx-native", "amx-avx2-build", "avx512", "avx2", "arm64", "unknown"])
def test_auto_turns_extra_buffers_off_only_where_amx_kernels_would_run(cpuinfo: str, info: str, on: bool) -> None:
    choice = cpu.choose("auto", cpu.cpu_flags(cpuinfo), info)
    assert choice.extra_bufts is on
    assert choice.reason.startswith("on" if on else "off: this CPU has AMX")


@pytest.mark.parametrize("cpuinfo", [SAPPHIRE_RAPIDS, ICE_LAKE, ZEN2, GRAVITON3])
def test_on_and_off_are_obeyed_on_every_cpu(cpuinfo: str) -> None:
    flags = cpu.cpu_flags(cpuinfo)
    assert cpu.choose("on", flags, NATIVE_AMX).extra_bufts is True
    assert cpu.choose("off", flags, AVX2_BUILD).extra_bufts is False


def test_flags_are_read_from_x86_and_arm_cpuinfo_and_shown_in_the_log() -> None:
    assert {"amx_tile", "amx_int8", "avx512f"} <= cpu.cpu_flags(SAPPHIRE_RAPIDS)
    assert {"asimd", "sve", "i8mm"} <= cpu.cpu_flags(GRAVITON3)
    assert cpu.shown(cpu.cpu_flags(SAPPHIRE_RAPIDS)) == ("avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8 "
                                                         "amx_bf16")
    assert cpu.shown(cpu.cpu_flags(GRAVITON3)) == "asimd sve i8mm"
    assert cpu.build_has_amx(NATIVE_AMX) and not cpu.build_has_amx(NATIVE_AVX512)
    assert not cpu.build_has_amx("CPU : AMX_INT8 = 0 |")
