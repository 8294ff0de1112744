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


def _module_reference(attn, query, reference_px, value_in, shapes):
    """MSDeformAttn.forward as it read before issue 17's rewrite: broadcast reference points,
    F.softmax, (N, Lq, M, L, P, 2) points moved into planes by the caller."""
    n, lq, _ = query.shape
    value = attn.value_proj(value_in).view(n, -1, attn.n_heads, attn.d_model // attn.n_heads)
    offsets = attn.sampling_offsets(query).view(n, lq, attn.n_heads, attn.n_levels, attn.n_points, 2)
    weights = attn.attention_weights(query).view(n, lq, attn.n_heads, attn.n_levels * attn.n_points)
    weights = F.softmax(weights, -1).view(n, lq, attn.n_heads, attn.n_levels, attn.n_points)
    points = reference_px[:, :, None, :, None, :] + offsets
    sampled = ms_deform_attn_core(value, shapes, points.movedim(-1, 0).contiguous(), weights)
    return attn.output_proj(sampled)


def test_module_with_shared_reference_planes_and_written_out_softmax_matches_the_broadcast_form() -> None:
    """The planes are the same sums as the broadcast add (equal bits); the written-out softmax
    differs from F.softmax by a few ulp only."""
    from dicom_node.model.ms_deform_attn import MSDeformAttn, reference_planes

    torch.manual_seed(0)
    shapes = [(5, 7), (10, 13)]
    s = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).eval()
    with torch.no_grad():
        attn.attention_weights.weight.mul_(20)  # peaked softmax: large logits exercise the max shift
    n = 2
    query, value_in = torch.randn(n, s, 32), torch.randn(n, s, 32)
    reference_px = torch.rand(n, s, 2, 2) * 12 - 1
    with torch.inference_mode():
        ours = attn(query, reference_planes(reference_px, attn.n_heads, attn.n_points), value_in, shapes)
        ref = _module_reference(attn, query, reference_px, value_in, shapes)
    assert ours.shape == ref.shape == (n, s, 32)
    assert float((ours - ref).abs().max()) < 1e-5


def test_mask_logits_read_channels_last_and_contiguous_maps_as_einsum_does() -> None:
    from dicom_node.model.transformer_decoder import mask_logits

    gen = torch.Generator().manual_seed(1)
    embedding = torch.randn(2, 7, 16, generator=gen)
    features = torch.randn(2, 16, 9, 11, generator=gen)
    expected = torch.einsum("bqc,bchw->bqhw", embedding, features)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = mask_logits(embedding, features.contiguous(memory_format=layout))
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), layout
