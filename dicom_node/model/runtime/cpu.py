"""What this CPU computes natively, read from ``/proc/cpuinfo`` (no torch: the names import this).

bf16 runtimes are offered only where the CPU has bf16 dot-product instructions (AVX512_BF16 on
AMD Zen 4 and Intel Cooper Lake / Sapphire Rapids, AMX-BF16 on Sapphire Rapids and later).
Elsewhere oneDNN and OpenVINO emulate bf16 with fp32 arithmetic plus conversions: slower than
fp32 and no more accurate, so there is nothing to measure.
"""

from __future__ import annotations

import functools
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first processor's ``flags`` line; empty where /proc/cpuinfo cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_refusal(flags: frozenset[str] | None = None) -> str | None:
    """None where the CPU has native bf16, else why a bf16 runtime is not offered."""
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in NATIVE_BF16_FLAGS):
        return None
    return f"this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)} not in /proc/cpuinfo's flags)"


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)
