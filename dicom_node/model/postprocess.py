"""From raw network outputs to kept part and person instances, with the official semantics.

The official code upsamples all 100 query masks to the photo's size (300 MB at 1024x768,
4.8 GB at 4000x3000) and then throws most away. Here:

* a candidate's score is class probability x mask score, and the mask score is below 1, so a
  candidate whose class probability is under the 0.1 cut can never be kept: only candidates
  that can pass are drawn at all;
* mask statistics and painting run only inside the bounding box of the query's positive
  logits: outside it all four bilinear source neighbours are <= 0, so the upsampled logit is
  <= 0 and the pixel contributes nothing to the mask or its score;
* the photo-size logits are computed with ATen's own per-element arithmetic
  (``fma(src[i0], w0, src[i1] * w1)`` along each axis, :func:`_lerp`) from gathers and
  broadcast multiplies, which stream at memory speed, instead of ``F.interpolate``'s generic
  kernel (about 40-60 ms per 12 MP query here against ~2 ms per streaming pass). Only for
  enlarging steps (the photo larger than the network input), and only after the weights and
  the arithmetic are checked against ``F.interpolate`` for the sizes (:func:`explicit_is_exact`);
  otherwise (a shrinking step, another build or CPU) the code uses ``F.interpolate`` itself;
* the score's sum runs over the same window-shaped float32 buffer as the official
  ``sigmoid(x) * (x > 0)`` (same element count, same order, same threads), so its bits are
  the ones a full-size computation gives on that window: torch's vectorised and scalar sigmoid
  differ in the last bit for ~0.1 % of inputs, and which elements take which path depends on
  the buffer's length, so the sigmoid is never applied to a compacted array;
* the label map is a running maximum of per-part keys (the float32 score, its lowest bits
  replaced by the class), one ``maximum`` per part instead of a compare-and-paint, read back
  with one bit mask at the end; part masks are recomputed on demand from the 14 MB of stride-4
  logits (``LazyMask``);
* where a C compiler is present, a kernel (:mod:`dicom_node.model.window_kernel`) does a
  window's whole statistics in one pass over it, row by row in cache: the logits (width pass,
  height pass, the same roundings), the threshold, the count, ATen's sigmoid (its vector body,
  SLEEF's expf, and its scalar tail, libm's, each element where ATen would take it) and ATen's
  one-thread sum (its cascade, chunk by chunk as :class:`Reductions`); then it paints the
  running maximum. Each ATen pass streamed the whole window through memory (~1.5-7 ms per
  48 MB window here); no window-sized float buffer exists any more (48 MB per worker at
  12 MP, and with it the heap's creep from photo to photo). Every part is checked against ATen
  at first use (:func:`native_is_exact`, :func:`sigmoid_vector_step`, :func:`banded_is_exact`,
  :func:`scored_is_exact`). Where the sigmoid's copy does not check out, the kernel works in
  1 MB slices with ATen's own sigmoid (:func:`_banded_sigmoid_sum`); without a compiler, or
  where the rest does not check out, the ATen path runs: the same bits each way;
* with several intra-op threads, queries are worked on that many at a time, each on one
  thread (:func:`_run_pass`), the sigmoid and the sum computed chunk by chunk as the threads
  would have split them (:class:`Reductions`), so the bits do not depend on it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.model import window_kernel

log = logging.getLogger(__name__)

SCORE_CUT = 0.1
TOPK = 100
RESIZED_CHUNK = 16  # queries upsampled to the network input size at once
CLASS_BITS = 5  # label-map keys carry the class id in this many low bits (M2FP parts: 1..19)
_EXACT_COUNT = 1 << 24  # float32 sums of 0/1 are exact integers below this


@dataclass(frozen=True)
class Candidate:
    query_index: int
    class_id: int
    class_prob: float


def select_candidates(pred_logits: torch.Tensor, human_class: int, topk: int = TOPK) -> list[Candidate]:
    """The top-k (query, class) pairs that could pass the cuts, parts then humans.

    softmax over all columns, drop the last (no-object) column, top-k over all pairs;
    Background (class 0) is never returned.
    """
    probs = F.softmax(pred_logits.float(), dim=-1)[:, :-1]
    n_classes = probs.shape[1]
    values, index = probs.flatten().topk(min(topk, probs.numel()), sorted=True)
    parts, humans = [], []
    for p, idx in zip(values.tolist(), index.tolist(), strict=True):
        q, c = divmod(idx, n_classes)
        if c == human_class:
            if p > SCORE_CUT:
                humans.append(Candidate(q, c, p))
        elif c != 0 and p >= SCORE_CUT:
            parts.append(Candidate(q, c, p))
    return parts + humans


def _source_index(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear (align_corners=False) source indices and weights along one axis."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    lam = (src - i0.float()).clamp_(0, 1)
    return i0, i1, lam


@dataclass(frozen=True)
class Axis:
    """ATen's bilinear (align_corners=False) taps along one axis: output k reads sources i0[k]
    and i1[k] with weights w0[k] and w1[k]."""

    i0: torch.Tensor
    i1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor

    def part(self, index: slice) -> Axis:
        return Axis(self.i0[index], self.i1[index], self.w0[index], self.w1[index])

    def shifted(self, offset: int) -> Axis:
        """The same taps on a source that starts ``offset`` rows later."""
        return Axis(self.i0 - offset, self.i1 - offset, self.w0, self.w1)


@functools.lru_cache(maxsize=64)
def linear_axis(out_size: int, in_size: int) -> Axis:
    """ATen's taps (UpSample.h, align_corners=False): scale = float(in) / out, source position
    fma(scale, k + 0.5, -0.5) clamped at 0, lambda = position - floor(position).

    The float32 fma is computed in float64, where the product of two float32 numbers and the
    subtraction of 0.5 are both exact, then rounded once: the fused result, bit for bit.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    pos = np.float64(scale) * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)).astype(np.float64) - 0.5
    src = np.maximum(pos.astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return Axis(torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(np.float32(1) - lam),
                torch.from_numpy(lam))


def _select(src: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``torch.index_select`` into ``out`` when one is given (its overloads do not take out=None)."""
    return torch.index_select(src, dim, index) if out is None else torch.index_select(src, dim, index, out=out)


def _gather(src: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.index_select(src, dim, index)`` for a contiguous ``src``, through a 2-D view.

    ATen copies whole rows when it gathers along dim 0 of a 2-D tensor, and runs a fast
    column gather along dim 1 of one; along dim 1 of a 3-D tensor, or the last of one, its
    generic loop is 2-3x slower (measured: (16, 160, 216) -> 853 columns 2.1 -> 0.7 ms, and
    (16, 160, 853) -> 640 rows 3.0 -> 1.5 ms). A gather is a copy, so the bits are the same.
    """
    if src.dim() == 3 and src.is_contiguous():
        k, h, w = src.shape
        if dim == 2:
            flat_out = None if out is None else out.view(k * h, -1)
            return _select(src.view(k * h, w), 1, index, flat_out).view(k, h, -1)
        if dim == 1:
            rows = (torch.arange(k).view(k, 1) * h + index.view(1, -1)).flatten()
            flat_out = None if out is None else out.view(-1, w)
            return _select(src.view(k * h, w), 0, rows, flat_out).view(k, -1, w)
    return _select(src, dim, index, out)


def _lerp(src: torch.Tensor, axis: Axis, dim: int, out: torch.Tensor | None = None,
          scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``fma(src[i0], w0, src[i1] * w1)`` along ``dim``: what ATen's bilinear kernel computes
    for each output element (the other axis's weights being 1 and 0 in a one-axis pass).

    ``out`` and ``scratch`` (same shape as the result) avoid fresh allocations.
    """
    shape = [1] * src.dim()
    shape[dim] = -1
    out = _gather(src, dim, axis.i1, out=out)
    out.mul_(axis.w1.view(shape))
    a = _gather(src, dim, axis.i0, out=scratch)
    return out.addcmul_(a, axis.w0.view(shape))  # out + a * w0, fused: one rounding, as ATen's


MAX_PERIOD = 512  # longest tap period the row pass below follows (photo heights seen: 6 to 189)


@functools.lru_cache(maxsize=64)
def tap_period(out_size: int, in_size: int) -> tuple[int, int] | None:
    """(p, q) such that output row k + p reads source rows q further than row k, or None.

    The exact ratio out/in = p/q (lowest terms) makes the taps periodic; float32 rounding can
    break it at a row (the clamped first rows do), which :func:`_lerp_rows` checks row by row.
    """
    g = math.gcd(out_size, in_size)
    p, q = out_size // g, in_size // g
    return (p, q) if p <= MAX_PERIOD and p < out_size else None


def _lerp_rows(src: torch.Tensor, axis: Axis, out: torch.Tensor, period: tuple[int, int]) -> torch.Tensor:
    """:func:`_lerp` along the rows (dim -2) of a contiguous (S, W) or (k, S, W) ``src`` into a
    contiguous ``out``, without gathers.

    Output rows u, u + p, u + 2p, ... read source rows i0[u] + j*q (and i1[u] + j*q): strided
    views of ``src``, so each phase is one multiply into a strided view of ``out`` and one
    fused multiply-add (the same two operations per element as :func:`_lerp`, so the same bits)
    instead of two row gathers, a multiply and a multiply-add over the whole window. Rows
    where the period does not hold (checked against the real taps) are computed by
    :func:`_lerp` afterwards.
    """
    p, q = period
    rows_out, width = out.shape[-2:]
    rows_src = src.shape[-2]
    batch = 1 if src.dim() == 2 else src.shape[0]
    i0, i1 = axis.i0.numpy(), axis.i1.numpy()
    if rows_out < 2 * p:
        return _lerp(src, axis, src.dim() - 2, out=out)
    # link k -> k + p holds where both taps move by exactly q rows
    linked = (i0[p:] == i0[:-p] + q) & (i1[p:] == i1[:-p] + q)
    broken = set(np.nonzero(~linked)[0].tolist())
    done = np.zeros(rows_out, dtype=bool)
    base, base_src = out.storage_offset(), src.storage_offset()
    for u in range(p):
        first, last = u, u + (rows_out - 1 - u) // p * p  # this phase's rows: first, first + p, ..., last
        if broken:  # keep the longest unbroken stretch; the other rows are computed below
            stretch_start, best = first, (first, first)
            for k in range(first, last + 1, p):
                if k in broken or k == last:
                    if k - stretch_start > best[1] - best[0]:
                        best = (stretch_start, k)
                    stretch_start = k + p
            first, last = best
        n = (last - first) // p + 1
        size = (batch, n, width)
        dst = out.as_strided(size, (rows_out * width, p * width, 1), base + first * width)
        top = src.as_strided(size, (rows_src * width, q * width, 1), base_src + int(i0[first]) * width)
        bottom = src.as_strided(size, (rows_src * width, q * width, 1), base_src + int(i1[first]) * width)
        torch.mul(bottom, axis.w1[first:last + 1:p].view(n, 1), out=dst)
        dst.addcmul_(top, axis.w0[first:last + 1:p].view(n, 1))
        done[first:last + 1:p] = True
    rest = torch.from_numpy(np.nonzero(~done)[0])
    if rest.numel():
        rows = Axis(axis.i0[rest], axis.i1[rest], axis.w0[rest], axis.w1[rest])
        out[..., rest, :] = _lerp(src, rows, src.dim() - 2)
    return out


@functools.lru_cache(maxsize=64)
def explicit_is_exact(out_hw: tuple[int, int], in_hw: tuple[int, int]) -> bool:
    """Whether :func:`_lerp` on both axes gives ``F.interpolate``'s bits from ``in_hw`` to ``out_hw``
    (enlarging only).

    Random probes through every output row and column (every tap and weight at these sizes),
    plus one small two-axis resize whose width is not a multiple of the vector length (the
    composition, and addcmul's scalar tail as well as its vector body). A build whose kernel
    rounds differently (no FMA) differs on a large fraction of random inputs, not a rare one.
    """
    (out_h, out_w), (in_h, in_w) = out_hw, in_hw
    if out_h < in_h or out_w < in_w:
        # Shrinking: ATen's kernel was seen to round a * w0 + b * w1 in the other order for some
        # shapes (3 of 80 random cases; never in 520 enlarging ones), so keep F.interpolate there.
        return False
    gen = torch.Generator().manual_seed(20260117)
    checks = [((3, in_w), (3, out_w)), ((in_h, 3), (out_h, 3)), ((37, 53), (150, 211))]
    for (sh, sw), (oh, ow) in checks:
        src = torch.randn(sh, sw, generator=gen) * 8
        want = F.interpolate(src[None, None], size=(oh, ow), mode="bilinear", align_corners=False)[0, 0]
        got = _lerp(_lerp(src, linear_axis(ow, sw), 1), linear_axis(oh, sh), 0)
        if not torch.equal(got, want):
            return False
    return True


@functools.lru_cache(maxsize=1)
def native_is_exact() -> bool:
    """Whether the kernel (:mod:`dicom_node.model.window_kernel`) gives the ATen path's bits:
    :func:`_lerp` along the width then the height, F.threshold(x, 0, -inf), the positive count and
    bytes, and the running maximum of ``key`` where positive, on random inputs with exact zeros and a NaN,
    over whole and partial windows whose widths are not multiples of a vector. A compiler that
    fused or reordered the arithmetic differs on a large fraction of such inputs, not a rare one.
    """
    kern = window_kernel.kernel()
    if kern is None:
        return False
    gen = torch.Generator().manual_seed(20261205)
    cases = [((37, 53), (150, 211), (slice(0, 150), slice(0, 211))),
             ((37, 53), (150, 211), (slice(17, 149), slice(3, 200))),
             ((20, 31), (61, 95), (slice(60, 61), slice(0, 95)))]
    for (in_h, in_w), (out_h, out_w), (rows, cols) in cases:
        src = torch.randn(in_h, in_w, generator=gen) * 4
        src[::5, ::3] = 0.0
        src[1::7, ::4] = -0.0
        oy, ox = linear_axis(out_h, in_h).part(rows), linear_axis(out_w, in_w).part(cols)
        top = int(oy.i0[0])
        want = _lerp(_lerp(src[top:int(oy.i1[-1]) + 1], ox, 1), oy.shifted(top), 0)
        F.threshold(want, 0.0, float("-inf"), inplace=True)
        got = torch.empty(want.shape)
        positive = torch.empty(want.shape, dtype=torch.uint8)
        positives, nans = kern.window_band(src, (ox.i0, ox.i1, ox.w0, ox.w1), (oy.i0, oy.i1, oy.w0, oy.w1),
                                           (0, want.numel()), torch.empty(2 * want.shape[1]), got.view(-1),
                                           positive.view(-1))
        if (not torch.equal(got, want) or not torch.equal(positive.bool(), want > 0)
                or positives != int((want > 0).sum()) or nans):
            return False
        best = torch.rand(out_h, out_w + 5, generator=gen) * 0.9
        key = float(torch.rand(1, generator=gen)) + 0.05
        expected = best.clone()
        torch.maximum(expected[rows, cols], (want > 0).float() * key, out=expected[rows, cols])
        kern.paint_max_bytes(positive, best[rows, cols], key)
        if not torch.equal(best, expected):
            return False
    src = torch.randn(8, 8, generator=gen)
    src[3, 4] = float("nan")
    axis = linear_axis(16, 8)
    taps = (axis.i0, axis.i1, axis.w0, axis.w1)
    _, nans = kern.window_band(src, taps, taps, (0, 256), torch.empty(32), torch.empty(256),
                               torch.empty(256, dtype=torch.uint8))
    return nans > 0


@functools.lru_cache(maxsize=1)
def sigmoid_vector_step() -> int | None:
    """How ATen's float32 sigmoid splits a contiguous call of n elements: the vector body on all but
    the last ``n % step`` (step = 2 x the vector length), which take the scalar loop. Found by trying
    the candidates on inputs whose sigmoid differs between the two; None where the kernel's copies
    of the two formulas (:meth:`~dicom_node.model.window_kernel.WindowKernel.sigmoid`) do not give
    ATen's bits on those inputs and on a sample of every magnitude, or no candidate fits."""
    kern = window_kernel.kernel()
    if kern is None:
        return None
    generator = torch.Generator().manual_seed(20261207)
    differs = _scalar_sigmoid_differs(generator)
    if differs.numel() < 64:
        return None
    special = torch.tensor([1e-45, 1e-30, 1e-7, 0.5, 1.0, 15.9, 16.7, 87.3, 88.8, 103.9, 104.1, 1e30,
                            float("inf"), float("-inf"), 0.0, -0.0, -1.0, -87.0, -104.5])
    sample = torch.cat([differs, torch.randn(1 << 16, generator=generator) * 8,
                        torch.rand(1 << 16, generator=generator) * 110, special])
    body = sample[:sample.numel() // 64 * 64]
    strided = torch.empty(2 * sample.numel())[::2].copy_(sample)  # a strided view takes the scalar loop
    with one_intra_op_thread():
        if (not torch.equal(kern.sigmoid(body, vector=True), body.sigmoid())
                or not torch.equal(kern.sigmoid(sample, vector=False), strided.sigmoid())):
            return None
        for step in (8, 16, 32, 64):
            fits = True
            for n in (77, 1016, 1039, 1048):
                x = differs.repeat(n // differs.numel() + 1)[:n].clone()
                cut = n - n % step
                got = torch.cat([kern.sigmoid(x[:cut], vector=True), kern.sigmoid(x[cut:], vector=False)])
                fits = fits and torch.equal(got, x.sigmoid())
            if fits:
                return step
    return None


@functools.lru_cache(maxsize=8)
def scored_is_exact(threads: int, emulate: bool) -> bool:
    """Whether the kernel's one-pass score (:meth:`MaskUpsampler.scored_window`) gives the ATen
    path's positives, bytes and sum bit for bit, with :class:`Reductions` ``(threads, emulate)``:
    its parts are checked first (:func:`native_is_exact`, :func:`banded_is_exact` for the sum,
    :func:`sigmoid_vector_step` for the sigmoid), then the whole on windows of one and of two
    thread chunks, each chunk ending in a scalar tail."""
    kern = window_kernel.kernel()
    step = sigmoid_vector_step()
    if kern is None or step is None or not native_is_exact() or not banded_is_exact(threads, emulate):
        return False
    gen = torch.Generator().manual_seed(20261208)
    reductions = Reductions(threads, emulate)
    state = kern.new_sum()
    cases = [((37, 53), (150, 211), (slice(3, 149), slice(0, 211))),
             ((61, 81), (301, 399), (slice(0, 301), slice(0, 399))),
             ((160, 216), (768, 1024), (slice(100, 700), slice(50, 1000)))]
    with one_intra_op_thread():
        for (in_h, in_w), (out_h, out_w), (rows, cols) in cases:
            src = torch.randn(in_h, in_w, generator=gen) * 6 + 1
            src[::4, ::3] = -0.0
            oy, ox = linear_axis(out_h, in_h).part(rows), linear_axis(out_w, in_w).part(cols)
            top = int(oy.i0[0])
            logits = _lerp(_lerp(src[top:int(oy.i1[-1]) + 1], ox, 1), oy.shifted(top), 0).contiguous()
            want_positive = logits > 0
            want_count = int(want_positive.sum())
            F.threshold(logits, 0.0, float("-inf"), inplace=True)
            want_sum = reductions.sum(reductions.sigmoid_(logits.view(-1)))
            n = logits.numel()
            chunks = thread_chunks(n, threads) if emulate else [(0, n)]
            bounds = torch.tensor([0] + [stop for _, stop in chunks], dtype=torch.int64)
            positive = torch.empty(logits.shape, dtype=torch.uint8)
            count, nans, total = kern.window_score(src, (ox.i0, ox.i1, ox.w0, ox.w1), (oy.i0, oy.i1, oy.w0, oy.w1),
                                                   bounds, step, torch.empty(2 * logits.shape[1]),
                                                   torch.empty(logits.shape[1]), positive, state)
            if (nans or count != want_count or not torch.equal(positive.bool(), want_positive)
                    or np.float32(total).tobytes() != np.float32(want_sum).tobytes()):
                return False
    return True


class MaskUpsampler:
    """Stride-4 mask logits -> padded input size -> crop -> photo size, the official chain.

    Both steps are F.interpolate (bilinear, align_corners=False) in the official code; here they
    are :func:`_lerp` along each axis where :func:`explicit_is_exact` confirms the bits, else
    F.interpolate itself. Statistics are restricted to a window.
    """

    def __init__(self, pred_masks: torch.Tensor, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
                 original_hw: tuple[int, int]) -> None:
        self.pred_masks = pred_masks.float()
        self.padded_hw, self.resized_hw, self.original_hw = padded_hw, resized_hw, original_hw
        self._y = _source_index(original_hw[0], resized_hw[0])
        self._x = _source_index(original_hw[1], resized_hw[1])
        in_hw = (int(pred_masks.shape[-2]), int(pred_masks.shape[-1]))
        self.explicit = explicit_is_exact(padded_hw, in_hw) and explicit_is_exact(original_hw, resized_hw)
        # padded-size taps, cropped to the resized photo: the crop only drops outputs
        self._ry = linear_axis(padded_hw[0], in_hw[0]).part(slice(0, resized_hw[0]))
        self._rx = linear_axis(padded_hw[1], in_hw[1]).part(slice(0, resized_hw[1]))
        self._oy = linear_axis(original_hw[0], resized_hw[0])
        self._ox = linear_axis(original_hw[1], resized_hw[1])
        self._row_period = tap_period(original_hw[0], resized_hw[0])
        self._resized_period = tap_period(padded_hw[0], in_hw[0])  # the crop keeps the padded taps
        self.kernel = window_kernel.kernel() if self.explicit and native_is_exact() else None

    @property
    def row_pass_needs_scratch(self) -> bool:
        """Whether :meth:`window_logits` uses its ``scratch`` (the row pass without a period)."""
        return not self.explicit or self._row_period is None

    def resized(self, queries: list[int]) -> torch.Tensor:
        """(k, h, w) logits at the network-input (resized photo) size."""
        if self.explicit:
            across = _lerp(self.pred_masks[queries], self._rx, 2)
            if self._resized_period is not None:
                out = torch.empty((len(queries), self.resized_hw[0], self.resized_hw[1]))
                return _lerp_rows(across, self._ry, out, self._resized_period)
            return _lerp(across, self._ry, 1)
        x = F.interpolate(self.pred_masks[queries][None], size=self.padded_hw, mode="bilinear", align_corners=False)
        return x[0, :, : self.resized_hw[0], : self.resized_hw[1]]

    def photo_size(self, resized: torch.Tensor) -> torch.Tensor:
        """(k, H, W) logits at the photo's size, by F.interpolate (the reference)."""
        return F.interpolate(resized[None], size=self.original_hw, mode="bilinear", align_corners=False)[0]

    def window_logits(self, resized: torch.Tensor, window: tuple[slice, slice], out: torch.Tensor | None = None,
                      scratch: torch.Tensor | None = None) -> torch.Tensor:
        """One query's photo-size logits inside ``window``, equal to :meth:`photo_size`'s there.

        ``resized`` is the query's (h, w) logits at the network-input size. The width pass runs
        only on the source rows the window reads and the height pass only on the window's
        columns: a small part on a 12 MP photo costs a fraction of the photo. ``out`` and
        ``scratch``: buffers of the window's shape.
        """
        rows, cols = window
        if not self.explicit:
            return self._window_logits_interpolate(resized, window)
        oy, ox = self._oy.part(rows), self._ox.part(cols)
        top, bottom = int(oy.i0[0]), int(oy.i1[-1]) + 1  # taps are non-decreasing
        across = _lerp(resized[top:bottom], ox, 1)
        if self._row_period is not None and out is not None and out.is_contiguous():
            return _lerp_rows(across, oy.shifted(top), out, self._row_period)
        return _lerp(across, oy.shifted(top), 0, out=out, scratch=scratch)

    def scored_window(self, resized: torch.Tensor, window: tuple[slice, slice], buffers: _Buffers,
                      reductions: Reductions) -> tuple[int, float, torch.Tensor] | None:
        """(positive count, sum of the sigmoid over the window, the window's 0/1 bytes) in one pass of
        the kernel (:func:`scored_is_exact`); None where it does not apply or a logit is NaN."""
        kern, step = self.kernel, sigmoid_vector_step()
        if kern is None or step is None:
            return None
        rows, cols = window
        oy, ox = self._oy.part(rows), self._ox.part(cols)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        n = shape[0] * shape[1]
        chunks = thread_chunks(n, reductions.threads) if reductions.emulate else [(0, n)]
        bounds = torch.tensor([0] + [stop for _, stop in chunks], dtype=torch.int64)
        positive = buffers.positive(shape)
        count, nans, total = kern.window_score(
            resized.contiguous(), (ox.i0, ox.i1, ox.w0, ox.w1), (oy.i0, oy.i1, oy.w0, oy.w1), bounds, step,
            buffers.get(1, (2, shape[1])), buffers.get(0, (1, shape[1])), positive,
            buffers.sum_state(kern))
        return None if nans else (count, total, positive)

    def banded_window(self, resized: torch.Tensor, window: tuple[slice, slice], buffers: _Buffers,
                      reductions: Reductions) -> tuple[int, float, torch.Tensor] | None:
        """(positive count, sum of the sigmoid over the window, the window's 0/1 bytes) by the
        kernel's banded path (:func:`_banded_sigmoid_sum`); None where the kernel does not apply or
        a logit is NaN."""
        kern = self.kernel
        if kern is None:
            return None
        rows, cols = window
        oy, ox = self._oy.part(rows), self._ox.part(cols)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        n = shape[0] * shape[1]
        src, positive, scratch = resized.contiguous(), buffers.positive(shape), buffers.get(1, (2, shape[1]))
        col_taps, row_taps = (ox.i0, ox.i1, ox.w0, ox.w1), (oy.i0, oy.i1, oy.w0, oy.w1)
        counts = [0, 0]

        def fill(f0: int, f1: int, piece: torch.Tensor) -> None:
            found, nans = kern.window_band(src, col_taps, row_taps, (f0, f1), scratch, piece, positive.view(-1))
            counts[0] += found
            counts[1] += nans

        chunks = thread_chunks(n, reductions.threads) if reductions.emulate else [(0, n)]
        total = _banded_sigmoid_sum(kern, buffers.sum_state(kern), chunks, buffers.band(), fill)
        return None if counts[1] else (counts[0], total, positive)

    def _window_logits_interpolate(self, resized: torch.Tensor, window: tuple[slice, slice]) -> torch.Tensor:
        """:meth:`window_logits` by F.interpolate: PyTorch's bilinear kernel interpolates along the
        width, then combines two such rows along the height, so a width-only resize followed by a
        height-only resize gives the same bits (tests/test_postprocess.py checks it)."""
        rows, cols = window
        y0, y1, _ = self._y
        src_top, src_bottom = int(y0[rows.start]), int(y1[rows.stop - 1]) + 1
        n_cols = cols.stop - cols.start
        # The height pass maps output rows onto the whole source height; rows the window never
        # reads stay zero (not garbage: a zero weight times NaN would still be NaN).
        columns = resized.new_zeros((1, 1, self.resized_hw[0], n_cols))
        columns[0, 0, src_top:src_bottom] = F.interpolate(
            resized[None, None, src_top:src_bottom], size=(src_bottom - src_top, self.original_hw[1]),
            mode="bilinear", align_corners=False)[0, 0, :, cols]
        out = F.interpolate(columns, size=(self.original_hw[0], n_cols), mode="bilinear", align_corners=False)
        return out[0, 0, rows]

    def window(self, pos: torch.Tensor) -> tuple[slice, slice] | None:
        """The photo-size box outside which a query's logits cannot be positive; None if nowhere.

        ``pos`` is the query's ``logits > 0`` at the network-input size.
        """
        flags = pos.view(torch.uint8)  # amax over 0/1 bytes is ``any``, vectorised (~10x faster here)
        rows = torch.nonzero(flags.amax(1)).flatten()
        if rows.numel() == 0:
            return None
        cols = torch.nonzero(flags.amax(0)).flatten()
        (y0, y1, _), (x0, x1, _) = self._y, self._x
        r_lo, r_hi, c_lo, c_hi = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        # photo rows/columns that read a source row/column inside the positive box
        ys = torch.nonzero((y1 >= r_lo) & (y0 <= r_hi)).flatten()
        xs = torch.nonzero((x1 >= c_lo) & (x0 <= c_hi)).flatten()
        if ys.numel() == 0 or xs.numel() == 0:
            return None  # shrinking to a small photo skips every source row/column that is positive
        return slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)

    def full_mask(self, query: int) -> np.ndarray:
        h, w = self.original_hw
        return (self.window_logits(self.resized([query])[0], (slice(0, h), slice(0, w))) > 0).numpy()


class LazyMask:
    """A part's photo-size mask, drawn when asked for (a few ms) instead of kept in memory."""

    def __init__(self, upsampler: MaskUpsampler, query: int) -> None:
        self.upsampler, self.query = upsampler, query

    def __call__(self) -> np.ndarray:
        return self.upsampler.full_mask(self.query)


@dataclass(frozen=True)
class KeptInstance:
    query_index: int
    class_id: int
    class_prob: float
    mask_score: float
    score: float
    person_overlap_px: tuple[int, ...] = ()  # parts: pixels shared with each kept person (network-input size)


@dataclass
class PostprocessOutput:
    parts: list[KeptInstance]
    humans: list[KeptInstance]
    human_masks: list[np.ndarray]  # bool, photo size, one per human
    label_map: np.ndarray  # uint8, photo size
    upsampler: MaskUpsampler


def _passes(candidates: list[Candidate], human_class: int) -> Iterator[tuple[bool, dict[int, list[Candidate]]]]:
    """(is_human_pass, candidates by query): humans first, so each part's overlap with every
    person is known when the part is kept."""
    for is_human_pass in (True, False):
        by_query: dict[int, list[Candidate]] = {}
        for cand in candidates:
            if (cand.class_id == human_class) == is_human_pass:
                by_query.setdefault(cand.query_index, []).append(cand)
        yield is_human_pass, by_query


ATEN_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: below it an element-wise op or a sum runs on one thread


def thread_chunks(n: int, threads: int) -> list[tuple[int, int]]:
    """How ``at::parallel_for`` splits ``n`` elements among ``threads`` OpenMP threads: as many
    threads as GRAIN_SIZE blocks, at most ``threads``, each a contiguous chunk of ceil(n / t)."""
    used = max(1, min(threads, -(-n // ATEN_GRAIN_SIZE)))
    step = -(-n // used)
    return [(start, min(n, start + step)) for start in range(0, n, step)] or [(0, 0)]


@dataclass(frozen=True)
class Reductions:
    """The sigmoid and the sum of a window's logits, as ``threads`` intra-op threads compute them.

    Their bits depend on the thread count: a sum adds each thread's partial sum (ATen's
    two-pass reduction), and each thread's chunk of a sigmoid ends in a scalar tail (fewer than
    two vectors' worth) that rounds differently from the vector body in the last bit. With
    ``emulate`` the caller runs with one intra-op thread and computes chunk by chunk exactly as
    the ``threads`` would (:func:`thread_chunks`), so the bits do not change when the
    postprocess works on several queries at once (:func:`postprocess`). Verified against the
    threaded ops at first use (:func:`reductions_reproducible`).
    """

    threads: int
    emulate: bool

    def sigmoid_(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.emulate:
            return flat.sigmoid_()
        for start, stop in thread_chunks(flat.numel(), self.threads):
            flat[start:stop].sigmoid_()
        return flat

    def sum(self, flat: torch.Tensor) -> float:
        if not self.emulate:
            return float(flat.sum())
        chunks = thread_chunks(flat.numel(), self.threads)
        total = flat[chunks[0][0]:chunks[0][1]].sum()
        for start, stop in chunks[1:]:
            total = total + flat[start:stop].sum()  # float32, in thread order, as the final reduction adds
        return float(total)


def _scalar_sigmoid_differs(generator: torch.Generator) -> torch.Tensor:
    """Inputs whose sigmoid differs between ATen's vector body and its scalar loop: a strided view
    takes the scalar loop, a contiguous one the vector body."""
    x = torch.randn(1 << 16, generator=generator) * 8
    vector = x.sigmoid()
    scalar = torch.empty(2 * x.numel())[::2].copy_(x).sigmoid()
    return x[vector != scalar]


@functools.lru_cache(maxsize=8)
def reductions_reproducible(threads: int) -> bool:
    """Whether :class:`Reductions` with ``emulate`` gives this build's ``threads``-thread bits.

    Sizes around every chunk boundary, filled with inputs whose sigmoid depends on the loop that
    computes it, so a chunk boundary off by one shows. Run with ``threads`` intra-op threads.
    """
    if threads < 2 or torch.get_num_threads() != threads:
        return False
    generator = torch.Generator().manual_seed(20261205)
    differs = _scalar_sigmoid_differs(generator)
    if differs.numel() == 0:
        return False  # cannot tell the loops apart here: do not rely on the emulation
    sizes = [ATEN_GRAIN_SIZE + 1, 2 * ATEN_GRAIN_SIZE + 31, threads * ATEN_GRAIN_SIZE + 5, 1_000_003, 3_000_017]
    for n in sizes:
        x = differs.repeat(n // differs.numel() + 1)[:n].clone()
        x[::7] = float("-inf")  # as thresholded logits: exact zeros after the sigmoid
        want = x.clone().sigmoid_()
        want_sum = float(want.sum())
        emulated = Reductions(threads, emulate=True)
        with one_intra_op_thread():
            got = emulated.sigmoid_(x.clone())
            got_sum = emulated.sum(got)
        if not torch.equal(got, want) or got_sum != want_sum:
            return False
    return True


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """ATen ops on one thread (process-wide), the caller's count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


BAND = 1 << 18  # window elements held at once on the banded path: 1 MB of float32, about one core's L2


def _banded_sigmoid_sum(kern: window_kernel.WindowKernel, state: window_kernel.SumState, chunks: list[tuple[int, int]],
                        band: torch.Tensor, fill: Callable[[int, int, torch.Tensor], None],
                        keep: Callable[[int, int, torch.Tensor], object] | None = None) -> float:
    """sum(sigmoid(x)) over a window that ``fill(f0, f1, piece)`` writes slice by slice, with the
    bits of :class:`Reductions` over the whole window: each thread chunk's sum is ATen's one-thread
    cascade, fed in order by the kernel; each slice's sigmoid is ATen's, the slices starting a
    multiple of ``BAND`` (a multiple of any vector loop's step) after their chunk's start, so that
    every element takes the vector body or the scalar tail it takes in the chunk-long call."""
    total: np.float32 | None = None
    for start, stop in chunks:
        kern.start_sum(state, stop - start)
        for f0 in range(start, stop, BAND):
            f1 = min(stop, f0 + BAND)
            piece = band[:f1 - f0]
            fill(f0, f1, piece)
            piece.sigmoid_()
            kern.feed_sum(state, piece)
            if keep is not None:
                keep(f0, f1, piece)
        part = np.float32(kern.finish_sum(state))
        total = part if total is None else np.float32(total + part)  # in thread order, as Reductions.sum
    return float(total) if total is not None else 0.0


def _copy_from(src: torch.Tensor, f0: int, f1: int, piece: torch.Tensor) -> None:
    piece.copy_(src[f0:f1])


def _copy_to(dst: torch.Tensor, f0: int, f1: int, piece: torch.Tensor) -> None:
    dst[f0:f1].copy_(piece)


@functools.lru_cache(maxsize=8)
def banded_is_exact(threads: int, emulate: bool) -> bool:
    """Whether :func:`_banded_sigmoid_sum` gives :class:`Reductions` ``(threads, emulate)``'s sigmoid
    and sum bit for bit: every element and the sum, at sizes around the thread chunks' and the
    slices' boundaries, on inputs whose sigmoid depends on the loop that computes it. Without the
    emulation only one thread can be reproduced (ATen would split the sum among the threads)."""
    kern = window_kernel.kernel()
    if kern is None or (threads > 1 and not emulate):
        return False
    generator = torch.Generator().manual_seed(20261206)
    differs = _scalar_sigmoid_differs(generator)
    if differs.numel() == 0:
        return False
    reductions = Reductions(threads, emulate)
    state, band = kern.new_sum(), torch.empty(BAND)
    sizes = [1, 31, 33, ATEN_GRAIN_SIZE + 1, 2 * ATEN_GRAIN_SIZE + 31, BAND - 1, BAND + 33, 3 * BAND + 7,
             1_000_003, 3_000_017, 12_000_039]
    with one_intra_op_thread():  # as the banded path runs: in a worker, or with one thread in all
        for n in sizes:
            x = differs.repeat(n // differs.numel() + 1)[:n].clone()
            x[::7] = float("-inf")
            x[3::11] = torch.rand(x[3::11].shape, generator=generator) * 0.01  # small positives
            want = x.clone()
            want_sum = reductions.sum(reductions.sigmoid_(want))
            got = torch.empty(n)
            chunks = thread_chunks(n, threads) if emulate else [(0, n)]
            got_sum = _banded_sigmoid_sum(kern, state, chunks, band, functools.partial(_copy_from, x),
                                          functools.partial(_copy_to, got))
            if not torch.equal(got, want) or np.float32(got_sum).tobytes() != np.float32(want_sum).tobytes():
                return False
    return True


def mask_score_in_place(logits: torch.Tensor, reductions: Reductions | None = None) -> tuple[float, torch.Tensor]:
    """The official mask score, sum(sigmoid(x) * (x > 0)) / (count(x > 0) + 1e-6), over a window.

    ``logits`` must be contiguous; it is overwritten with the mask as 0.0/1.0 (returned). The
    sum runs over the window-shaped buffer itself: same length and order as the official
    computation on that window, so the same float32 rounding and the same vectorised/scalar
    split of the sigmoid. Logits <= 0 become -inf, whose sigmoid is exactly +0.0, as
    sigmoid(x) * False is; NaN stays NaN either way.
    """
    reductions = reductions or Reductions(torch.get_num_threads(), emulate=False)
    F.threshold(logits, 0.0, float("-inf"), inplace=True)
    flat = logits.view(-1)
    total = reductions.sum(reductions.sigmoid_(flat))
    ones = logits.ceil_()  # the sigmoid of a positive logit lies in [0.5, 1]
    count = int(ones.sum()) if ones.numel() < _EXACT_COUNT else int(ones.count_nonzero())
    return total / (count + 1e-6), ones


def label_key(score: float, class_id: int) -> float:
    """A part's label-map key: float32(score) with its CLASS_BITS lowest bits replaced by the class.

    Keys order as the scores do, except within one 2**CLASS_BITS-ulp bucket (relative width
    ~4e-6): a running maximum of keys gives the class of the highest-scoring part, as painting in
    order with ``best < score`` (float32) does, wherever the winning bucket holds one class;
    :func:`postprocess` repaints the pixels of a bucket that holds two (:func:`_repaint_ties`).
    """
    bits = int(np.float32(score).view(np.int32))
    return float(np.int32((bits >> CLASS_BITS << CLASS_BITS) | class_id).view(np.float32))


class _Buffers:
    """One worker's buffers: two flat float32 ones and one of bytes, grown to the largest window
    seen and viewed at each window's shape; the banded path's slice and sum state."""

    def __init__(self) -> None:
        self._flat = [torch.empty(0), torch.empty(0)]
        self._bytes = torch.empty(0, dtype=torch.uint8)
        self._band: torch.Tensor | None = None
        self._sum_state: window_kernel.SumState | None = None

    def positive(self, shape: tuple[int, int]) -> torch.Tensor:
        n = shape[0] * shape[1]
        if self._bytes.numel() < n:
            self._bytes = torch.empty(n, dtype=torch.uint8)
        return self._bytes[:n].view(shape)

    def band(self) -> torch.Tensor:
        if self._band is None:
            self._band = torch.empty(BAND)
        return self._band

    def sum_state(self, kern: window_kernel.WindowKernel) -> window_kernel.SumState:
        if self._sum_state is None:
            self._sum_state = kern.new_sum()
        return self._sum_state

    def get(self, i: int, shape: tuple[int, int]) -> torch.Tensor:
        n = shape[0] * shape[1]
        if self._flat[i].numel() < n:
            self._flat[i] = torch.empty(n)
        return self._flat[i][:n].view(shape)


def _repaint_ties(up: MaskUpsampler, parts: list[KeptInstance], region: torch.Tensor,
                  label_map: torch.Tensor) -> None:
    """Paint ``region`` of ``label_map`` part by part in keep order (``best < score`` in float32):
    the reference semantics, for the pixels whose winning key bucket holds two classes.

    Every pixel of ``region`` is covered by one of ``parts`` (its maximum key came from one) and
    by no part of a higher score (that part's key would be higher), so painting only these
    parts, only there, gives what painting every part everywhere gives.
    """
    best = torch.zeros(up.original_hw, dtype=torch.float32)
    painted = torch.zeros(up.original_hw, dtype=torch.uint8)
    for part in parts:
        resized = up.resized([part.query_index])[0]
        win = up.window(resized > 0)
        if win is None:
            continue
        rows, cols = win
        positive = up.window_logits(resized, win) > 0
        win_best = best[rows, cols]  # views: writing them writes the maps
        wins = torch.lt(win_best, part.score).logical_and_(positive).logical_and_(region[rows, cols])
        win_best.masked_fill_(wins, part.score)
        painted[rows, cols].masked_fill_(wins, part.class_id)
    label_map[region] = painted[region]


PARALLEL_CHUNK = 4  # queries one worker takes at a time when several work at once


@dataclass
class _QueryResult:
    """What one query contributed, handed back in query order."""

    humans: list[tuple[KeptInstance, np.ndarray, torch.Tensor]] = field(default_factory=list)  # + mask, flags
    parts: list[tuple[KeptInstance, float]] = field(default_factory=list)  # + label-map key


@dataclass
class _Pass:
    """One pass over the candidates (people first, then parts) and what its queries share."""

    up: MaskUpsampler
    by_query: dict[int, list[Candidate]]
    is_human_pass: bool
    human_flags: list[torch.Tensor]  # kept people's positives at the network-input size
    best_key: torch.Tensor  # the label map's running maximum of keys
    reductions: Reductions
    paint_lock: contextlib.AbstractContextManager
    kernel_path: str = ""  # "scored", "banded" or "" (ATen's): what the checks allow for these reductions

    def _mask_score(self, resized: torch.Tensor, win: tuple[slice, slice],
                    buffers: _Buffers) -> tuple[float, torch.Tensor, str]:
        """The query's mask score over its window, a tensor of the window's shape that is 0 exactly
        where the photo-size logit is <= 0, and the path that computed them:

        * "scored" (:attr:`kernel_path`): the kernel's one pass, the sigmoid and ATen's sum
          reproduced in it; the mask is 0/1 bytes;
        * "banded": the kernel computes the window slice by slice in cache, ATen's sigmoid runs on
          each slice and the kernel adds them as ATen's sum would (:func:`_banded_sigmoid_sum`);
        * "aten": no kernel, or NaN logits (the ATen path decides what those give).

        Neither kernel path keeps a window-sized float buffer: 48 MB less per worker at 12 MP.
        """
        up = self.up
        rows, cols = win
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        found = None
        if self.kernel_path == "scored":
            found = up.scored_window(resized, win, buffers, self.reductions)
        elif self.kernel_path == "banded":
            found = up.banded_window(resized, win, buffers, self.reductions)
        if found is not None:
            positives, total, mask = found
            return total / (positives + 1e-6), mask, self.kernel_path
        scratch = buffers.get(1, shape) if up.row_pass_needs_scratch else None
        logits = up.window_logits(resized, win, out=buffers.get(0, shape), scratch=scratch)
        if not logits.is_contiguous() or logits.data_ptr() != buffers.get(0, shape).data_ptr():
            logits = buffers.get(0, shape).copy_(logits)  # F.interpolate fallback: own tensor
        mask_score, ones = mask_score_in_place(logits, self.reductions)
        return mask_score, ones, "aten"

    def run(self, queries: list[int], buffers: _Buffers) -> list[tuple[int, _QueryResult]]:
        up, found = self.up, []
        for q, resized in zip(queries, up.resized(queries), strict=True):
            resized_pos = resized > 0
            win = up.window(resized_pos)
            if win is None:
                continue  # no positive pixel: mask score 0, never kept
            rows, cols = win
            mask_score, ones, path = self._mask_score(resized, win, buffers)
            result = _QueryResult()
            for cand in self.by_query[q]:
                score = cand.class_prob * mask_score
                if self.is_human_pass:
                    if score > SCORE_CUT:
                        full = np.zeros(up.original_hw, dtype=bool)
                        full[rows, cols] = ones.numpy() != 0  # the sigmoid, or its ceiling: 0 only where x <= 0
                        result.humans.append((KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score),
                                              full, resized_pos))
                elif score >= SCORE_CUT:
                    overlap = tuple(int((resized_pos & h).sum()) for h in self.human_flags)
                    key = label_key(score, cand.class_id)
                    result.parts.append((KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score, overlap),
                                         key))
            if result.parts:
                # The query's classes share its mask, so the running maximum gains only their
                # highest key (mask x key is key or 0): one pass, in place (the 0/1 mask is not
                # read again). The tie repaint below still sees every kept part's bucket.
                key = max(key for _, key in result.parts)
                with self.paint_lock:  # a maximum is order-free, but two at once would race
                    win_best = self.best_key[rows, cols]  # a view: writing it writes the map
                    if path != "aten" and up.kernel is not None:
                        up.kernel.paint_max_bytes(ones, win_best, key)
                    else:
                        torch.maximum(win_best, ones.mul_(key), out=win_best)
            found.append((q, result))
        return found


@functools.lru_cache(maxsize=4)
def _query_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="postprocess")


def _run_pass(work: _Pass, parallel: bool) -> list[_QueryResult]:
    """Every query of the pass, in query order. ``parallel``: the intra-op threads' count of
    Python threads, each on a few queries at a time with one intra-op thread: ATen splits each
    element-wise pass over 12 MP between threads well, but not the Python between the passes,
    the column gathers (one thread in ATen) or a small photo's short passes (measured, the same
    outputs interleaved in one process, untrained model, 2 threads, Zen 4: 0.28 -> 0.17 s at
    1024x768, 1.38 -> 1.18 s at 4000x3000). The reductions emulate the intra-op threads
    (:class:`Reductions`), so the bits are the same either way."""
    queries = list(work.by_query)
    if not parallel:
        buffers = _Buffers()
        return [r for start in range(0, len(queries), RESIZED_CHUNK)
                for _, r in work.run(queries[start:start + RESIZED_CHUNK], buffers)]
    # One set of window buffers per worker, grown to the largest window it meets (a trained
    # model's parts are far smaller than the photo). A parsing process has one malloc arena
    # (dicom_node.allocator.PARSING): with one per thread and nothing trimmed, what the workers
    # allocated stayed resident beside the main arena's (+150 MB at 12 MP, measured).
    free: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
    for _ in range(work.reductions.threads):
        free.put(_Buffers())
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def run(chunk: list[int]) -> list[tuple[int, _QueryResult]]:
        buffers = free.get()
        try:
            with torch.inference_mode(inference):
                return work.run(chunk, buffers)
        finally:
            free.put(buffers)

    chunks = [queries[i:i + PARALLEL_CHUNK] for i in range(0, len(queries), PARALLEL_CHUNK)]
    with one_intra_op_thread():
        done = [r for found in _query_pool(work.reductions.threads).map(run, chunks) for r in found]
    return [r for _, r in done]


@functools.lru_cache(maxsize=8)
def _kernel_path(threads: int, emulate: bool) -> str:
    """The window kernel's path these reductions allow (see :meth:`_Pass._mask_score`), logged once:
    an administrator sees which one a worker runs, and why not the fastest."""
    path = "scored" if scored_is_exact(threads, emulate) else "banded" if banded_is_exact(threads, emulate) else ""
    if path == "scored":
        log.info("event=postprocess.kernel status=ready path=one-pass threads=%d", threads)
    elif path == "banded":
        log.warning("event=postprocess.kernel status=ready path=slices threads=%d reason=%s", threads,
                    "the kernel's sigmoid did not match ATen's here; ATen's sigmoid runs slice by slice")
    else:
        log.warning("event=postprocess.kernel status=refused threads=%d reason=%s", threads,
                    "the kernel's sum did not match ATen's here; the slower ATen path runs (same bits)")
    return path


def postprocess(pred_logits: torch.Tensor, pred_masks: torch.Tensor, padded_hw: tuple[int, int],
                resized_hw: tuple[int, int], original_hw: tuple[int, int], human_class: int) -> PostprocessOutput:
    """Kept parts (score >= 0.1) and humans (score > 0.1), the label map and the human masks.

    pred_logits (Q, K+1) and pred_masks (Q, h, w) for one image. Each label-map pixel takes the
    class of the highest-scoring kept part whose mask covers it (the first kept on a float32
    tie), 0 where none does. With several intra-op threads, queries are worked on in parallel
    (:func:`_run_pass`) where this build's reductions can be reproduced on one thread.
    """
    candidates = select_candidates(pred_logits, human_class)
    up = MaskUpsampler(pred_masks, padded_hw, resized_hw, original_hw)
    best_key = torch.zeros(original_hw, dtype=torch.float32)
    threads = torch.get_num_threads()
    parallel = reductions_reproducible(threads)
    reductions = Reductions(threads, emulate=parallel)
    kernel_path = _kernel_path(threads, parallel) if up.kernel is not None else ""
    lock: contextlib.AbstractContextManager = threading.Lock() if parallel else contextlib.nullcontext()
    humans: list[KeptInstance] = []
    human_masks: list[np.ndarray] = []
    human_flags: list[torch.Tensor] = []
    parts: list[KeptInstance] = []
    bucket_parts: dict[int, list[int]] = {}  # key bucket -> indices into parts
    keys_exact = human_class <= 1 << CLASS_BITS
    for is_human_pass, by_query in _passes(candidates, human_class):
        work = _Pass(up, by_query, is_human_pass, human_flags, best_key, reductions, lock, kernel_path)
        for result in _run_pass(work, parallel):
            for person, mask, flags in result.humans:
                humans.append(person)
                human_masks.append(mask)
                human_flags.append(flags)
            for part, key in result.parts:
                parts.append(part)
                bucket = int(np.float32(key).view(np.int32)) >> CLASS_BITS
                bucket_parts.setdefault(bucket, []).append(len(parts) - 1)
    label_map = (best_key.view(torch.int32) & ((1 << CLASS_BITS) - 1)).to(torch.uint8)
    if not keys_exact:  # class ids beyond CLASS_BITS: every pixel by the reference painting
        _repaint_ties(up, parts, torch.ones(original_hw, dtype=torch.bool), label_map)
    else:
        # A bucket that two classes share (equal or nearly equal scores: seen with bf16 networks,
        # whose coarser logits give ties) decides its pixels by the reference painting.
        for bucket, members in bucket_parts.items():
            if len({parts[i].class_id for i in members}) > 1:
                region = (best_key.view(torch.int32) >> CLASS_BITS) == bucket
                _repaint_ties(up, [parts[i] for i in members], region, label_map)
    return PostprocessOutput(parts, humans, human_masks, label_map.numpy(), up)


def postprocess_lowres(pred_logits: torch.Tensor, pred_masks: torch.Tensor, padded_hw: tuple[int, int],
                       resized_hw: tuple[int, int], original_hw: tuple[int, int], human_class: int
                       ) -> PostprocessOutput:
    """The fast variant: scores and label map at the network-input size, then upsampled.

    Mask scores are means over the network-input grid instead of the photo's pixels, and the label
    map is painted there and upsampled by nearest neighbour: a 12 MP photo costs what a 0.5 MP one
    does. Person masks and part masks are still the official photo-size ones. Not the official
    semantics: a candidate within ~0.003 of the 0.1 cut may flip, and label-map boundaries move by
    up to one network-input pixel; how far it agrees with :func:`postprocess` is measured by the
    tests and the parse benchmark.
    """
    candidates = select_candidates(pred_logits, human_class)
    up = MaskUpsampler(pred_masks, padded_hw, resized_hw, original_hw)
    label_small = torch.zeros(resized_hw, dtype=torch.uint8)
    best = torch.zeros(resized_hw, dtype=torch.float32)
    humans: list[KeptInstance] = []
    human_masks: list[np.ndarray] = []
    human_resized: list[torch.Tensor] = []
    parts: list[KeptInstance] = []
    for is_human_pass, by_query in _passes(candidates, human_class):
        queries = list(by_query)
        for start in range(0, len(queries), RESIZED_CHUNK):
            chunk = queries[start:start + RESIZED_CHUNK]
            resized = up.resized(chunk)
            for i, q in enumerate(chunk):
                positive = resized[i] > 0
                count = positive.sum()
                if not bool(count):
                    continue
                mask_score = float(torch.where(positive, resized[i].sigmoid(), 0).sum() / (count + 1e-6))
                for cand in by_query[q]:
                    score = cand.class_prob * mask_score
                    if is_human_pass:
                        if score > SCORE_CUT:
                            humans.append(KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score))
                            human_masks.append((up.photo_size(resized[i:i + 1])[0] > 0).numpy())
                            human_resized.append(positive)
                    elif score >= SCORE_CUT:
                        overlap = tuple(int((positive & h).sum()) for h in human_resized)
                        parts.append(KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score, overlap))
                        wins = positive & (best < score)
                        best[wins] = score
                        label_small[wins] = cand.class_id
    # nearest neighbour to the photo's size (pixel centres: source index floor((k + 0.5) * in / out))
    h, w = original_hw
    rows = np.minimum(((np.arange(h) + 0.5) * resized_hw[0] / h).astype(np.int64), resized_hw[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * resized_hw[1] / w).astype(np.int64), resized_hw[1] - 1)
    label_map = label_small.numpy()[rows][:, cols]
    return PostprocessOutput(parts, humans, human_masks, label_map, up)
