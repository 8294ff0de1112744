"""Keep freed memory for reuse, so the next large buffer does not fault its pages in again.

glibc hands blocks above its mmap threshold (128 KiB to 32 MiB, adapting) back to the kernel on
free, so the next allocation of the same size starts from unmapped pages and pays one page
fault per 4 KiB. Under a hypervisor a fault costs several microseconds. Two kinds of process
suffer from it here:

* a parsing process: every M2FP layer allocates and frees tensors of 10-50 MB (an encoder FFN's
  hidden state is 11340 x 1024 floats). Measured: a 46 MB ``torch.empty(...).fill_()`` took
  17 ms with glibc's defaults and 2.4 ms with :data:`PARSING`; the 640x864 forward went from
  4.30 s to 3.76 s. Such a process keeps its high-water mark (about 1 GiB), which it would reach
  again on the next photo anyway.
* the node process, whose intake copies each received object through several fresh 1 MB
  buffers (the PDU, the reassembled data set, the O_DIRECT staging): pynetdicom acknowledged
  ~90 photos/s with the defaults and ~105 with :data:`NODE` (same run, no-op handler), at the
  same resident size. The node's trim threshold is bounded, so a burst of 12 MP photos on
  several associations does not stay resident for good.
"""

from __future__ import annotations

import ctypes
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@dataclass(frozen=True)
class Thresholds:
    mmap_bytes: int  # blocks below this come from the heap, and are reused after free
    trim_bytes: int  # the heap's free top is given back above this
    # at most this many malloc arenas (0: glibc's default, 8 per core). A thread that allocates
    # gets an arena of its own, and with nothing trimmed each keeps its high-water mark: the
    # exact postprocess's workers (one per intra-op thread) added 150 MB at 4000x3000 that one
    # shared arena reuses (measured: +550 vs +397 MiB over the process's start; the network's
    # time unchanged, 1.25-1.29 s either way, Zen 4).
    arenas: int = 0


# never give the heap's top back; one arena
PARSING = Thresholds(mmap_bytes=1 << 30, trim_bytes=2**31 - 1, arenas=1)
NODE = Thresholds(mmap_bytes=64 << 20, trim_bytes=256 << 20)

_applied: Thresholds | None = None


def keep_freed_memory(thresholds: Thresholds = PARSING) -> bool:
    """Tell glibc to reuse freed blocks instead of unmapping them; True if it took effect.

    Process-wide. A later call only ever raises the thresholds (a node process that also loads
    the parser ends with :data:`PARSING`). A no-op (False) off glibc (macOS, musl).
    """
    global _applied
    if _applied is not None:
        arenas = min((n for n in (_applied.arenas, thresholds.arenas) if n), default=0)
        thresholds = Thresholds(max(_applied.mmap_bytes, thresholds.mmap_bytes),
                                max(_applied.trim_bytes, thresholds.trim_bytes), arenas)
        if thresholds == _applied:
            return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, thresholds.mmap_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, thresholds.trim_bytes))
        if thresholds.arenas:
            ok = ok and bool(libc.mallopt(_M_ARENA_MAX, thresholds.arenas))
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt refused the allocator thresholds; large buffers will be re-faulted")
        return False
    _applied = thresholds
    return True


def _status_kib(field: str) -> int | None:
    """One ``kB`` field of /proc/self/status (VmRSS, VmHWM); None where /proc cannot tell (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_resident_gib() -> float:
    """This process's own peak resident size (VmHWM), GiB. Not getrusage: Linux carries ru_maxrss
    over execve, so a child would report the peak of the parent that started it."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def resident_mib() -> float | None:
    """This process's resident size now (VmRSS), MiB; None where /proc cannot tell (not Linux)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024
