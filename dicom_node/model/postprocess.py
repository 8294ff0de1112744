"""From raw network outputs to kept part and person instances, with the official semantics.

The official code upsamples all 100 query masks to the photo's size (300 MB at 1024x768) and
then throws most away. A candidate's score is class probability x mask score, and the mask
score is below 1, so a candidate whose class probability is under the 0.1 cut can never be
kept: we only draw the masks of candidates that can pass, a few at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCORE_CUT = 0.1
TOPK = 100
MASK_CHUNK_PIXELS = 32_000_000  # float32 elements drawn at once (about 128 MB)


@dataclass(frozen=True)
class Instance:
    query_index: int
    class_id: int
    class_prob: float
    mask_score: float
    score: float
    mask: np.ndarray  # bool (H, W) at the original size


def select_candidates(pred_logits: torch.Tensor, human_class: int, topk: int = TOPK
                      ) -> list[tuple[int, int, float]]:
    """(query, class, class_prob) of the top-k pairs that could pass the cuts, parts then humans.

    softmax over all columns, drop the last (no-object) column, top-k over all (query, class)
    pairs; Background (class 0) is never returned.
    """
    probs = F.softmax(pred_logits.float(), dim=-1)[:, :-1]
    n_classes = probs.shape[1]
    values, index = probs.flatten().topk(min(topk, probs.numel()), sorted=True)
    parts, humans = [], []
    for p, idx in zip(values.tolist(), index.tolist(), strict=True):
        q, c = divmod(idx, n_classes)
        if c == human_class:
            if p > SCORE_CUT:
                humans.append((q, c, p))
        elif c != 0 and p >= SCORE_CUT:
            parts.append((q, c, p))
    return parts + humans


def upsample_masks(mask_logits: torch.Tensor, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
                   original_hw: tuple[int, int]) -> torch.Tensor:
    """Stride-4 logits -> padded input size -> crop -> original size (bilinear, align_corners=False)."""
    x = F.interpolate(mask_logits[None], size=padded_hw, mode="bilinear", align_corners=False)
    x = x[:, :, : resized_hw[0], : resized_hw[1]]
    return F.interpolate(x, size=original_hw, mode="bilinear", align_corners=False)[0]


def instances_from_outputs(pred_logits: torch.Tensor, pred_masks: torch.Tensor, padded_hw: tuple[int, int],
                           resized_hw: tuple[int, int], original_hw: tuple[int, int], human_class: int
                           ) -> list[Instance]:
    """Kept instances, parts first then humans, each in descending class-probability order.

    pred_logits (Q, K+1) and pred_masks (Q, h, w) for one image. Parts are kept when
    score >= 0.1, humans when score > 0.1 (the official cuts).
    """
    candidates = select_candidates(pred_logits, human_class)
    queries = sorted({q for q, _, _ in candidates})
    h, w = original_hw
    chunk = max(1, MASK_CHUNK_PIXELS // max(1, h * w))
    mask_score: dict[int, float] = {}
    mask_bits: dict[int, np.ndarray] = {}
    for start in range(0, len(queries), chunk):
        qs = queries[start:start + chunk]
        full = upsample_masks(pred_masks[qs].float(), padded_hw, resized_hw, original_hw)
        positive = full > 0
        flat_pos = positive.flatten(1)
        scores = (full.sigmoid().flatten(1) * flat_pos).sum(1) / (flat_pos.sum(1) + 1e-6)
        for i, q in enumerate(qs):
            mask_score[q] = float(scores[i])
            mask_bits[q] = positive[i].numpy()
        del full, positive
    kept = []
    for q, c, p in candidates:
        score = p * mask_score[q]
        keep = score > SCORE_CUT if c == human_class else score >= SCORE_CUT
        if keep:
            kept.append(Instance(q, c, p, mask_score[q], score, mask_bits[q]))
    return kept


def label_map_from_instances(parts: list[Instance], size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W): each pixel takes the class of the highest-scoring part covering it, else 0."""
    label_map = np.zeros(size_hw, dtype=np.uint8)
    for inst in sorted(parts, key=lambda i: i.score):  # ascending: the best is painted last
        label_map[inst.mask] = inst.class_id
    return label_map
