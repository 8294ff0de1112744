"""What this CPU computes natively, read from ``/proc/cpuinfo`` (no torch: the names import this).

bf16 runtimes are offered only where the CPU has bf16 dot-product instructions (AVX512_BF16 on
AMD Zen 4 and Intel Cooper Lake / Sapphire Rapids, AMX-BF16 on Sapphire Rapids and later).
Elsewhere oneDNN and OpenVINO emulate bf16 with fp32 arithmetic plus conversions: slower than
fp32 and no more accurate, so there is nothing to measure.

An administrator can cap the instruction set oneDNN uses (``ONEDNN_MAX_CPU_ISA``, or the older
``DNNL_MAX_CPU_ISA``; oneDNN's "CPU Dispatcher Control"), for instance so that a fleet of mixed
Zen 3 and Zen 4 nodes all parse in fp32. The CPU's flags then overstate what the libraries run: a
cap below AVX512_CORE_BF16 is read as "no native bf16" (eager-bf16's matrix products go through
oneDNN, which would emulate bf16 there), and below AVX512_CORE_VNNI / AVX2_VNNI as "no VNNI".
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads the first one set
# oneDNN's ISA names (dnnl_cpu_isa_t) that lack bf16 / int8 dot products; AVX2_VNNI_2 converts
# bf16 but has no bf16 dot product. A name not listed (AVX512_CORE_BF16, the AMX ones, ALL,
# DEFAULT, or one this list predates) caps nothing here.
_CAPS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                "AVX512_CORE_VNNI"})
_CAPS_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def isa_cap(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(variable, value) of the oneDNN instruction-set cap in force, or None."""
    environ = os.environ if environ is None else environ
    for variable in ISA_CAP_VARIABLES:
        value = environ.get(variable, "").strip().upper()
        if value:
            return variable, value
    return None


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


def native_bf16_refusal(flags: frozenset[str] | None = None,
                        environ: Mapping[str, str] | None = None) -> str | None:
    """None where the CPU has native bf16 and no cap hides it, else why a bf16 runtime is not offered."""
    flags = cpu_flags() if flags is None else flags
    if not any(f in flags for f in NATIVE_BF16_FLAGS):
        return f"this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)} not in /proc/cpuinfo's flags)"
    cap = isa_cap(environ)
    if cap is not None and cap[1] in _CAPS_WITHOUT_BF16:
        return f"no native bf16 under {cap[0]}={cap[1]} (oneDNN capped below AVX512_CORE_BF16)"
    return None


def has_vnni(flags: frozenset[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    cap = isa_cap(environ)
    return any(f in flags for f in VNNI_FLAGS) and (cap is None or cap[1] not in _CAPS_WITHOUT_VNNI)


def isa_signature(environ: Mapping[str, str] | None = None) -> str:
    """The instruction-set caps in force (PyTorch's ATEN_CPU_CAPABILITY, oneDNN's), "" if none:
    they change a runtime's speed and bits as a different CPU would."""
    environ = os.environ if environ is None else environ
    caps = [f"{v}={environ[v].strip()}" for v in ("ATEN_CPU_CAPABILITY", *ISA_CAP_VARIABLES)
            if environ.get(v, "").strip()]
    return " ".join(caps)
