"""The exact postprocess's window statistics in one pass (``window_kernel.c``), compiled for this CPU.

Why compiled here rather than shipped: the kernel is a page of C with no Python API, built with
the system's C compiler for the CPU it runs on (``-march=native``) in a fraction of a second, once
per process, into a temporary directory that is removed at once (nothing to cache, invalidate or
keep writable under a hardened service). Where no compiler is found or the build fails, the
postprocess keeps its ATen path, which gives the same bits more slowly; :func:`kernel` says which.
Before first use the checks in :mod:`dicom_node.model.postprocess` compare each entry point with
ATen on inputs chosen to tell them apart, so a compiler or build that rounds differently is caught
rather than trusted.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("window_kernel.c")
# -ffp-contract=off: the compiler may not fuse a product and a sum on its own (the C writes each
# fma out, as ATen computes it); no -ffast-math, which would reorder and drop NaN semantics.
# -fno-math-errno and -fno-trapping-math change no value (errno and floating-point traps are not
# looked at here) and let GCC vectorise the sigmoid (its selects and rintf); the checks in
# dicom_node.model.postprocess compare the bits with ATen's either way.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared",
          "-fPIC")
DISABLE_ENV = "DICOM_NODE_NO_WINDOW_KERNEL"  # set (non-empty) to keep the ATen path


SumState = ctypes.Array[ctypes.c_char]  # one thread's state of ATen's sum, fed in pieces (cascade_t)


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _taps(src: torch.Tensor, cols: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...]
          ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The taps as the C code takes them (column indices as int32), after checking every index
    lies inside ``src``: the C code reads where they point without looking."""
    h, w = src.shape
    for index, size in ((cols[0], w), (cols[1], w), (rows[0], h), (rows[1], h)):
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise ValueError("window kernel: a tap points outside the source")
    if src.dtype != torch.float32 or any(t.dtype != torch.float32 for t in (cols[2], cols[3], rows[2], rows[3])):
        raise ValueError("window kernel: float32 logits and weights expected")
    return ((cols[0].to(torch.int32), cols[1].to(torch.int32), cols[2], cols[3]),
            (rows[0].to(torch.int64), rows[1].to(torch.int64), rows[2], rows[3]))


@dataclass(frozen=True)
class WindowKernel:
    """The entry points of ``window_kernel.c`` over torch tensors (pointers, no copies).

    ctypes releases the GIL during each call, so the postprocess's query threads run them at once.
    """

    library: ctypes.CDLL

    def window_band(self, src: torch.Tensor, cols: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...],
                    span: tuple[int, int], scratch: torch.Tensor, out: torch.Tensor,
                    positive: torch.Tensor) -> tuple[int, int]:
        """Elements ``span`` = [f0, f1) of the row-major window into ``out`` (length f1 - f0) and their
        0/1 bytes (logit > 0) into ``positive`` at the same positions (the whole window's bytes);
        (positives, NaNs). ``src`` (h, w) contiguous float32, the query's logits at the network-input
        size; ``cols`` and ``rows`` the window's taps (i0, i1, w0, w1) as contiguous int64/float32
        tensors, rows as absolute source rows; ``scratch`` two rows of the window's width."""
        f0, f1 = span
        n_cols = cols[0].numel()
        cols, rows = _taps(src, cols, rows)
        for t in (src, scratch, out, positive, *cols, *rows):
            if not t.is_contiguous():
                raise ValueError("window kernel: tensors must be contiguous")
        if (scratch.numel() < 2 * n_cols or out.numel() < f1 - f0 or positive.dtype != torch.uint8
                or not 0 <= f0 <= f1 <= min(positive.numel(), rows[0].numel() * n_cols)):
            raise ValueError("window kernel: shapes do not match")
        nans = ctypes.c_int64(0)
        positives = self.library.window_band(
            _pointer(src), src.shape[1], *(_pointer(t) for t in cols), n_cols, *(_pointer(t) for t in rows),
            f0, f1, _pointer(scratch), _pointer(out), ctypes.c_void_p(positive.data_ptr() + f0), ctypes.byref(nans))
        return int(positives), int(nans.value)

    def window_score(self, src: torch.Tensor, cols: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...],
                     bounds: torch.Tensor, vec_step: int, scratch: torch.Tensor, line: torch.Tensor,
                     positive: torch.Tensor, state: SumState) -> tuple[int, int, float]:
        """A window's (positives, NaNs, sum of the sigmoid) in one pass, and its 0/1 bytes into
        ``positive``; ``bounds`` (int64): the chunks' bounds 0 = b0 < b1 < ... = n; ``line``: a row."""
        n_cols, n_rows = cols[0].numel(), rows[0].numel()
        cols, rows = _taps(src, cols, rows)
        for t in (src, scratch, line, positive, bounds, *cols, *rows):
            if not t.is_contiguous():
                raise ValueError("window kernel: tensors must be contiguous")
        if (scratch.numel() < 2 * n_cols or line.numel() < n_cols or positive.dtype != torch.uint8
                or positive.numel() < n_rows * n_cols or bounds.dtype != torch.int64 or bounds.numel() < 2
                or int(bounds[0]) != 0 or int(bounds[-1]) != n_rows * n_cols or vec_step < 1):
            raise ValueError("window kernel: shapes do not match")
        nans, total = ctypes.c_int64(0), ctypes.c_float(0)
        positives = self.library.window_score(
            _pointer(src), src.shape[1], *(_pointer(t) for t in cols), n_cols, *(_pointer(t) for t in rows), n_rows,
            _pointer(bounds), bounds.numel() - 1, vec_step, _pointer(scratch), _pointer(line), _pointer(positive),
            state, ctypes.byref(nans), ctypes.byref(total))
        return int(positives), int(nans.value), float(total.value)

    def sigmoid(self, x: torch.Tensor, vector: bool) -> torch.Tensor:
        """The kernel's copy of ATen's sigmoid: its vector body or its scalar tail, element-wise."""
        x = x.contiguous()
        out = torch.empty_like(x)
        (self.library.sigmoid_vector if vector else self.library.sigmoid_scalar)(_pointer(x), _pointer(out), x.numel())
        return out

    def new_sum(self) -> SumState:
        """A state for :meth:`start_sum` / :meth:`feed_sum` / :meth:`finish_sum` (one per thread)."""
        return ctypes.create_string_buffer(int(self.library.cascade_state_bytes()))

    def start_sum(self, state: SumState, n: int) -> None:
        """Begin ATen's one-thread sum of ``n`` float32 elements, fed in order in pieces."""
        self.library.cascade_start(state, n)

    def feed_sum(self, state: SumState, piece: torch.Tensor) -> None:
        if not piece.is_contiguous() or piece.dtype != torch.float32:
            raise ValueError("window kernel: a sum is fed contiguous float32")
        self.library.cascade_feed(state, _pointer(piece), piece.numel())

    def feed_zeros(self, state: SumState, n: int) -> None:
        """:meth:`feed_sum` of ``n`` zeros, without reading any (what the one-pass score feeds for a
        row with no positive logit)."""
        self.library.cascade_feed_zeros(state, n)

    def finish_sum(self, state: SumState) -> float:
        """The float32 sum (NaN when the pieces did not add up to ``n``)."""
        return float(self.library.cascade_finish(state))

    def paint_max_bytes(self, positive: torch.Tensor, best: torch.Tensor, key: float) -> None:
        """``best = max(best, key)`` where ``positive`` (0/1 bytes, as :meth:`window_band` writes them)
        is 1; ``best`` a (rows, cols) view of the label map's keys with unit column stride. Equal to
        ``torch.maximum(best, positive * key)`` for best >= 0 and a positive finite key."""
        if not positive.is_contiguous() or positive.dtype != torch.uint8 or best.stride(1) != 1 \
                or positive.shape != best.shape:
            raise ValueError("window kernel: paint needs a contiguous mask and a row-major window")
        self.library.paint_max_bytes(_pointer(positive), positive.shape[0], positive.shape[1], _pointer(best),
                                     best.stride(0), ctypes.c_float(key))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def kernel() -> WindowKernel | None:
    """The compiled kernel, or None (no compiler, a failed build, or disabled by ``DISABLE_ENV``)."""
    if os.environ.get(DISABLE_ENV):
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("event=postprocess.kernel status=unavailable reason=%s",
                    "no C compiler (cc/gcc); the exact postprocess keeps its slower ATen path")
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-kernel-") as tmp:
            library_path = Path(tmp) / "window_kernel.so"
            subprocess.run([compiler, *CFLAGS, "-o", str(library_path), str(SOURCE), "-lm"],
                           check=True, capture_output=True, timeout=120)
            library = ctypes.CDLL(str(library_path))  # mapped: the file may go with the directory
    except (OSError, subprocess.SubprocessError) as exc:  # no writable temp dir, a failed build, noexec
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("event=postprocess.kernel status=unavailable reason=%r detail=%r", str(exc),
                    detail.decode(errors="replace")[-300:])
        return None
    return bind(library)


def bind(library: ctypes.CDLL) -> WindowKernel:
    """The entry points' C signatures on a loaded ``window_kernel.c`` library."""
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.window_score.restype = i64
    library.window_score.argtypes = [p, i64, p, p, p, p, i64, p, p, p, p, i64, p, i64, i64, p, p, p, p,
                                     ctypes.POINTER(i64), ctypes.POINTER(f32)]
    for name in ("sigmoid_vector", "sigmoid_scalar"):
        getattr(library, name).restype = None
        getattr(library, name).argtypes = [p, p, i64]
    library.window_band.restype = i64
    library.window_band.argtypes = [p, i64, p, p, p, p, i64, p, p, p, p, i64, i64, p, p, p, ctypes.POINTER(i64)]
    library.cascade_state_bytes.restype = i64
    library.cascade_state_bytes.argtypes = []
    library.cascade_start.restype = None
    library.cascade_start.argtypes = [p, i64]
    library.cascade_feed.restype = None
    library.cascade_feed.argtypes = [p, p, i64]
    library.cascade_feed_zeros.restype = None
    library.cascade_feed_zeros.argtypes = [p, i64]
    library.cascade_finish.restype = f32
    library.cascade_finish.argtypes = [p]
    library.paint_max_bytes.restype = None
    library.paint_max_bytes.argtypes = [p, i64, i64, p, i64, f32]
    return WindowKernel(library)
