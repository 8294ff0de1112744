"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch: no compiled kernel needed."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=2)
def _point_constants(spatial_shapes: tuple[tuple[int, int], ...], n: int, lq: int, m: int, n_points: int,
                     rows_per_image: int) -> tuple[torch.Tensor, ...]:
    """Per sampling point (N, Lq, M, L, P): its level's width, height, last column and row
    (float32), the table rows one padded row down (``(W + 2) * M``) and the table row of the
    top-left corner when ``x0 = y0 = 0`` (level start, head, image; int32). Materialised once
    per input shape (~26 MB at 640x864) because the same arithmetic broadcast from (L, 1) runs
    element by element: with full-size operands every op is one vectorised pass (2.2x faster
    sampler, same bits). Row indices stay integer arithmetic: an exporter that lowers float
    arithmetic to bf16 (OpenVINO's bf16 inference precision) must not round them."""
    n_levels = len(spatial_shapes)
    shape = (n, lq, m, n_levels, n_points)
    sizes = torch.tensor(spatial_shapes, dtype=torch.float32)
    height = sizes[:, 0].view(n_levels, 1).expand(shape).contiguous()
    width = sizes[:, 1].view(n_levels, 1).expand(shape).contiguous()
    starts = torch.tensor([0] + [(h + 2) * (w + 2) for h, w in spatial_shapes[:-1]], dtype=torch.int32).cumsum(0)
    row_down = ((sizes[:, 1].to(torch.int32) + 2) * m).view(n_levels, 1).expand(shape).contiguous()
    corner = (starts.view(n_levels, 1) * m + torch.arange(m, dtype=torch.int32).view(m, 1, 1)
              + (torch.arange(n, dtype=torch.int32) * (rows_per_image * m)).view(n, 1, 1, 1, 1))
    return width, height, width - 1, height - 1, row_down, (corner + row_down + m).to(torch.int32).contiguous()


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                        sampling_xy: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Sample every head's points bilinearly on every level and mix them by attention weight.

    value (N, S, M, D); sampling_xy (2, N, Lq, M, L, P): the points' x and y planes in each
    level's pixel grid, pixel k's centre at k (that is ``location * size - 0.5`` for the
    reference's locations in [0, 1], grid_sample with align_corners=False), contiguous (it is
    overwritten); attention_weights (N, Lq, M, L, P). Returns (N, Lq, M*D).

    The reference runs ``grid_sample`` per level and then a weighted sum over a (.., Lq, L*P)
    stack, which is memory-bound on CPU. The result is a weighted sum of 4 corner rows per
    sampling point, so we compute each corner's row index and weight (attention weight x
    bilinear weight) and let ``embedding_bag`` gather and sum the rows in one fused call. Each
    level gets a one-pixel zero border and locations are clamped onto it, which reproduces
    grid_sample's zeros padding (align_corners=False) exactly. Same sums in another order
    (differences ~1e-6), about 1.7x less CPU time than grid_sample on this machine.

    Row indices are int32 (``embedding_bag`` takes them: half the bytes of int64 for the largest
    array here), computed against per-point constants (:func:`_point_constants`).
    """
    n, _, m, d = value.shape
    _, _, lq, _, n_levels, n_points = sampling_xy.shape
    padded, rows_per_image, offset = [], 0, 0
    for h, w in spatial_shapes:
        level = value[:, offset:offset + h * w].reshape(n, h, w, m * d)
        padded.append(F.pad(level, (0, 0, 1, 1, 1, 1)).reshape(n, (h + 2) * (w + 2), m * d))
        rows_per_image += (h + 2) * (w + 2)
        offset += h * w
    table = torch.cat(padded, 1).reshape(n * rows_per_image * m, d)  # row = (image, padded pixel, head)

    width, height, last_col, last_row, row_down, corner = _point_constants(
        tuple((int(h), int(w)) for h, w in spatial_shapes), n, lq, m, n_points, rows_per_image)
    # clamped onto the zero border: a point further out reads only zeros either way
    x = torch.minimum(sampling_xy[0].clamp_(min=-1), width)
    y = torch.minimum(sampling_xy[1].clamp_(min=-1), height)
    x0 = torch.minimum(x.floor(), last_col)
    y0 = torch.minimum(y.floor(), last_row)
    fx, fy = x.sub_(x0), y.sub_(y0)
    # ((y0 + 1) * (W + 2) + x0 + 1 + level start) * M + head + image rows
    top_left = torch.addcmul(corner, y0.to(torch.int32), row_down).add_(x0.to(torch.int32), alpha=m)
    index = torch.stack((top_left, top_left + m, top_left + row_down, top_left + row_down + m), -1)
    w_bottom = attention_weights * fy
    w_top = attention_weights - w_bottom
    w_top_right, w_bottom_right = w_top * fx, w_bottom * fx
    weights = torch.stack((w_top - w_top_right, w_top_right, w_bottom - w_bottom_right, w_bottom_right), -1)
    bag = n_levels * n_points * 4
    out = F.embedding_bag(index.view(n * lq * m, bag), table, per_sample_weights=weights.view(n * lq * m, bag),
                          mode="sum")
    return out.view(n, lq, m * d)


def reference_planes(reference_px: torch.Tensor, n_heads: int, n_points: int) -> torch.Tensor:
    """(N, Lq, L, 2) token centres -> the (2, N, Lq, M, L, P) planes :meth:`MSDeformAttn.forward`
    takes; computed once per image and shared by every layer."""
    n, lq, n_levels, _ = reference_px.shape
    planes = reference_px.movedim(-1, 0)[:, :, :, None, :, None]
    return planes.expand(2, n, lq, n_heads, n_levels, n_points).contiguous()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, reference_xy: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (N, Lq, C); reference_xy (2, N, Lq, M, L, P): each token's centre in every
        level's pixel grid, as x and y planes repeated for every head and point
        (:func:`reference_planes`).

        The reference adds offsets / (W, H) to [0, 1] reference points and the sampler multiplies
        by (W, H) again; adding the offsets in pixel units is the same point without two passes.
        Adding them to full-size planes is one vectorised pass that writes the sampler's layout:
        broadcasting (Lq, 1, L, 1, 2) references over the offsets ran element by element, 5 ms
        per layer at 1024x768, plus a copy into planes (the same sums, so the same bits).
        """
        n, lq, _ = query.shape
        value = self.value_proj(input_flatten).view(n, -1, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        # Softmax over each head's L*P (12) logits, written out: ATen's softmax over a last
        # dimension this short runs row by row (9.5 ms a layer at 1024x768, Zen 4); the same
        # formula in whole-tensor passes takes 1.9 ms and differs from F.softmax by a few ulp
        # (its exp is a different approximation). In fp32 under bf16 autocast too, as
        # autocast's F.softmax would be.
        logits = self.attention_weights(query).float().view(n, lq, self.n_heads, self.n_levels * self.n_points)
        exp = (logits - logits.amax(-1, keepdim=True)).exp_()
        weights = exp.div_(exp.sum(-1, keepdim=True)).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # The sampler always runs in fp32 (a no-op for an fp32 model): under bf16 autocast the
        # projections come out bf16, and embedding_bag takes one dtype for table and weights.
        points = torch.add(reference_xy, offsets.movedim(-1, 0).float())
        sampled = ms_deform_attn_core(value.float(), spatial_shapes, points, weights)
        return self.output_proj(sampled)
