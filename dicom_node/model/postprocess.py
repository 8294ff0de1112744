"""From raw network outputs to kept part and person instances, with the official semantics.

The official code upsamples all 100 query masks to the photo's size (300 MB at 1024x768,
4.8 GB at 4000x3000) and then throws most away. Here:

* a candidate's score is class probability x mask score, and the mask score is below 1, so a
  candidate whose class probability is under the 0.1 cut can never be kept: only candidates
  that can pass are drawn at all;
* mask statistics and painting run only inside the bounding box of the query's positive
  logits: outside it all four bilinear source neighbours are <= 0, so the upsampled logit is
  <= 0 and the pixel contributes nothing to the mask or its score; and only that box is
  upsampled to the photo's size (two 1-D passes that give the 2-D kernel's bits exactly);
* the label map is painted as we go (a best-score map decides each pixel), so no full-size
  float mask is ever kept; part masks are recomputed on demand from the 14 MB of stride-4
  logits (``LazyMask``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCORE_CUT = 0.1
TOPK = 100
RESIZED_CHUNK = 16  # queries upsampled to the network input size at once


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


class MaskUpsampler:
    """Stride-4 mask logits -> padded input size -> crop -> photo size, the official chain.

    Both steps are F.interpolate (bilinear, align_corners=False), so the photo-size logits are
    bit-identical to the official ones; only the statistics are restricted to a window.
    """

    def __init__(self, pred_masks: torch.Tensor, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
                 original_hw: tuple[int, int]) -> None:
        self.pred_masks = pred_masks.float()
        self.padded_hw, self.resized_hw, self.original_hw = padded_hw, resized_hw, original_hw
        self._y = _source_index(original_hw[0], resized_hw[0])
        self._x = _source_index(original_hw[1], resized_hw[1])

    def resized(self, queries: list[int]) -> torch.Tensor:
        """(k, h, w) logits at the network-input (resized photo) size."""
        x = F.interpolate(self.pred_masks[queries][None], size=self.padded_hw, mode="bilinear", align_corners=False)
        return x[0, :, : self.resized_hw[0], : self.resized_hw[1]]

    def photo_size(self, resized: torch.Tensor) -> torch.Tensor:
        """(k, H, W) logits at the photo's size."""
        return F.interpolate(resized[None], size=self.original_hw, mode="bilinear", align_corners=False)[0]

    def window_logits(self, resized: torch.Tensor, window: tuple[slice, slice]) -> torch.Tensor:
        """One query's photo-size logits inside ``window``, equal to :meth:`photo_size`'s there.

        ``resized`` is the query's (h, w) logits at the network-input size. PyTorch's bilinear
        kernel interpolates along the width, then combines two such rows along the height, so a
        width-only resize followed by a height-only resize gives the same bits
        (tests/test_postprocess.py checks it). The width pass runs only on the source rows the
        window reads and the height pass only on the window's columns: a small part on a 12 MP
        photo costs a fraction of the photo.
        """
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
        rows = torch.nonzero(pos.any(1)).flatten()
        if rows.numel() == 0:
            return None
        cols = torch.nonzero(pos.any(0)).flatten()
        (y0, y1, _), (x0, x1, _) = self._y, self._x
        r_lo, r_hi, c_lo, c_hi = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        # photo rows/columns that read a source row/column inside the positive box
        ys = torch.nonzero((y1 >= r_lo) & (y0 <= r_hi)).flatten()
        xs = torch.nonzero((x1 >= c_lo) & (x0 <= c_hi)).flatten()
        if ys.numel() == 0 or xs.numel() == 0:
            return None  # shrinking to a small photo skips every source row/column that is positive
        return slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)

    def full_mask(self, query: int) -> np.ndarray:
        return (self.photo_size(self.resized([query]))[0] > 0).numpy()


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


def postprocess(pred_logits: torch.Tensor, pred_masks: torch.Tensor, padded_hw: tuple[int, int],
                resized_hw: tuple[int, int], original_hw: tuple[int, int], human_class: int) -> PostprocessOutput:
    """Kept parts (score >= 0.1) and humans (score > 0.1), the label map and the human masks.

    pred_logits (Q, K+1) and pred_masks (Q, h, w) for one image. Each label-map pixel takes the
    class of the highest-scoring kept part whose mask covers it, 0 where none does.
    """
    candidates = select_candidates(pred_logits, human_class)
    up = MaskUpsampler(pred_masks, padded_hw, resized_hw, original_hw)
    label_map = torch.zeros(original_hw, dtype=torch.uint8)
    best = torch.zeros(original_hw, dtype=torch.float32)
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
                resized_pos = resized[i] > 0
                win = up.window(resized_pos)
                if win is None:
                    continue  # no positive pixel: mask score 0, never kept
                rows, cols = win
                values = up.window_logits(resized[i], win)
                positive = values > 0
                # count_nonzero: a bool .sum() would first copy the window to int64
                mask_score = float(values.sigmoid_().mul_(positive).sum()) / (int(positive.count_nonzero()) + 1e-6)
                for cand in by_query[q]:
                    score = cand.class_prob * mask_score
                    if is_human_pass:
                        if score > SCORE_CUT:
                            humans.append(KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score))
                            full = np.zeros(original_hw, dtype=bool)
                            full[rows, cols] = positive.numpy()
                            human_masks.append(full)
                            human_resized.append(resized_pos)
                    elif score >= SCORE_CUT:
                        overlap = tuple(int((resized_pos & h).sum()) for h in human_resized)
                        parts.append(KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score, overlap))
                        win_best = best[rows, cols]  # views: writing them writes the maps
                        wins = torch.lt(win_best, score).logical_and_(positive)
                        win_best.masked_fill_(wins, score)
                        label_map[rows, cols].masked_fill_(wins, cand.class_id)
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
