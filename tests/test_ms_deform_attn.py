"""Our deformable-attention core against the reference grid_sample formulation (mmcv's CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dicom_node.model.ms_deform_attn import ms_deform_attn_core


def reference_core(value, spatial_shapes, sampling_locations, attention_weights):
    """mmcv's multi_scale_deformable_attn_pytorch, written out."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def test_matches_grid_sample_reference_including_out_of_range_points() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (10, 13), (20, 27)]
    s = sum(h * w for h, w in shapes)
    n, lq, m, d, levels, points = 2, 50, 4, 8, 3, 4
    value = torch.randn(n, s, m, d, generator=gen)
    # locations reach 30 % outside the map on every side, exercising zeros padding
    locations = torch.rand(n, lq, m, levels, points, 2, generator=gen) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])  # exact borders
    locations[0, 0, 0, 0, 1] = torch.tensor([-5.0, 7.0])  # far outside
    weights = torch.softmax(torch.randn(n, lq, m, levels * points, generator=gen), -1).view(n, lq, m, levels, points)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (L, 2) = (W, H)
    points = locations * size[:, None, :] - 0.5  # the same points in each level's pixel grid
    ours = ms_deform_attn_core(value, shapes, points.movedim(-1, 0).contiguous(), weights)
    ref = reference_core(value, shapes, locations, weights)
    assert ours.shape == ref.shape == (n, lq, m * d)
    assert float((ours - ref).abs().max()) < 1e-5
