"""Which CPU modes this machine runs fast: the instruction sets each mode's kernels need, read from the CPU's flags.

Torch-free (``doctor`` and ``bench`` read it). A mode is always *usable*; ``native`` says whether its
arithmetic has hardware of its own here, which is what decides whether it is worth running:

* ORT FP32: MLAS's AVX-512 or AVX2 FMA kernels.
* ORT INT8: MLAS's int8 GEMM: AMX-INT8 (ORT ≥ 1.14), AVX-512 VNNI or AVX-VNNI; without VNNI the exact
  U8U8 kernel the runtime selects (``session.x64quantprecision``) is no faster than FP32.
* torch bf16: oneDNN's AMX-BF16 or AVX-512 BF16 kernels; otherwise bf16 is converted to fp32 around
  every GEMM (slower than fp32).
* torch fp16: AMX-FP16 or AVX-512 FP16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

#: /proc/cpuinfo flag -> the instruction set's name
FEATURES = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512_vnni": "AVX-512 VNNI",
            "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "avx512_fp16": "AVX-512 FP16",
            "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "amx_fp16": "AMX-FP16"}


@dataclass(frozen=True)
class CpuMode:
    """One way of running the flow on this CPU: ``native`` when ``kernel`` has hardware of its own here."""

    name: str
    native: bool
    kernel: str


def cpu_flags(cpuinfo: Optional[str] = None) -> frozenset[str]:
    """The flags of the first processor in ``cpuinfo`` (default: /proc/cpuinfo; empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_features(flags: Iterable[str]) -> list[str]:
    """The instruction sets of :data:`FEATURES` that ``flags`` name, in that table's order."""
    have = set(flags)
    return [name for flag, name in FEATURES.items() if flag in have]


def _first(flags: set[str], *options: str) -> Optional[str]:
    return next((FEATURES[f] for f in options if f in flags), None)


def cpu_modes(flags: Iterable[str]) -> list[CpuMode]:
    """ORT FP32, ORT INT8, torch bf16 and torch fp16 on a CPU with ``flags`` (see the module docstring)."""
    have = set(flags)
    fp32 = _first(have, "avx512f", "avx2")
    int8 = _first(have, "amx_int8", "avx512_vnni", "avx_vnni")
    bf16 = _first(have, "amx_bf16", "avx512_bf16")
    fp16 = _first(have, "amx_fp16", "avx512_fp16")
    return [
        CpuMode("ORT FP32", fp32 is not None, f"MLAS {fp32}" if fp32 else "MLAS without AVX2 (slow)"),
        CpuMode("ORT INT8", int8 is not None,
                f"MLAS int8 GEMM on {int8}" if int8 else "exact U8U8 int8 GEMM without VNNI (no faster than FP32)"),
        CpuMode("torch bf16", bf16 is not None,
                f"oneDNN {bf16}" if bf16 else "no bf16 arithmetic: converted to fp32 around each GEMM (slower)"),
        CpuMode("torch fp16", fp16 is not None,
                f"oneDNN {fp16}" if fp16 else "no fp16 arithmetic: converted to fp32 around each GEMM (slower)"),
    ]
