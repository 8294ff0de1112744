"""Mask2Former's multi-scale deformable-attention pixel decoder.

A 6-layer deformable-attention encoder mixes res3..res5, then one FPN step adds res2 and a
1x1 conv gives the stride-4 ``mask_features`` that every query's mask is drawn on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.model.config import PixelDecoderConfig
from dicom_node.model.ms_deform_attn import MSDeformAttn, reference_planes
from dicom_node.model.position_encoding import sine_position_embedding

GROUPNORM_GROUPS = 32


class ConvGroupNorm(nn.Conv2d):
    """A bias-free conv with its GroupNorm stored as ``<conv>.norm`` (detectron2 naming)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding=padding, bias=False)
        self.norm = nn.GroupNorm(GROUPNORM_GROUPS, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention, then a ReLU feed-forward block."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_xy: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_xy, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu_(self.linear1(src))))


class DeformableEncoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, n_levels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.conv_dim, cfg.dim_feedforward, n_levels, cfg.nheads, cfg.n_points)
            for _ in range(cfg.enc_layers)
        )


class DeformableTransformer(nn.Module):
    """Holds the encoder and the per-level embedding (``pixel_decoder.transformer.*`` keys)."""

    def __init__(self, cfg: PixelDecoderConfig, n_levels: int) -> None:
        super().__init__()
        self.encoder = DeformableEncoder(cfg, n_levels)
        self.level_embed = nn.Parameter(torch.zeros(n_levels, cfg.conv_dim))
        self.n_heads, self.n_points = cfg.nheads, cfg.n_points

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]) -> torch.Tensor:
        spatial_shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        level_size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=src_flat.dtype, device=src_flat.device)
        # each token's centre in every level's pixel grid (pixel k's centre at k), computed once
        reference_px = _reference_points(spatial_shapes, src_flat.device) * level_size - 0.5
        reference_xy = reference_planes(reference_px.expand(src_flat.shape[0], -1, -1, -1), self.n_heads, self.n_points)
        out = src_flat
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, reference_xy, spatial_shapes)
        return out


def _reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Pixel-centre coordinates of every token, in [0, 1], repeated for each level: (1, S, L, 2).

    Without padding the valid ratios are all 1, so the reference code's scaling by them is a no-op.
    """
    per_level = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        per_level.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    ref = torch.cat(per_level, 0)[None]
    return ref[:, :, None].expand(-1, -1, len(spatial_shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, in_channels: dict[str, int]) -> None:
        super().__init__()
        self.in_features = cfg.transformer_in_features  # res3, res4, res5
        n_levels = len(self.in_features)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], cfg.conv_dim, 1), nn.GroupNorm(GROUPNORM_GROUPS, cfg.conv_dim))
            for name in reversed(self.in_features)  # coarsest first
        )
        self.transformer = DeformableTransformer(cfg, n_levels)
        self.conv_dim = cfg.conv_dim
        # One FPN level (res2): log2(stride 8) - log2(common stride 4) = 1.
        self.adapter_1 = ConvGroupNorm(in_channels["res2"], cfg.conv_dim, 1)
        self.layer_1 = ConvGroupNorm(cfg.conv_dim, cfg.conv_dim, 3, padding=1)
        self.mask_features = nn.Conv2d(cfg.conv_dim, cfg.mask_dim, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns ``mask_features`` (stride 4) and the three multi-scale maps, coarsest first."""
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, reversed(self.in_features), strict=True):
            x = features[name]
            srcs.append(proj(x))
            pos.append(sine_position_embedding(x.shape[2], x.shape[3], self.conv_dim // 2, device=x.device))
        memory = self.transformer(srcs, pos)
        n = memory.shape[0]
        multi_scale, start = [], 0
        for s in srcs:
            h, w = s.shape[2], s.shape[3]
            multi_scale.append(memory[:, start:start + h * w].transpose(1, 2).reshape(n, -1, h, w))
            start += h * w
        lateral = self.adapter_1(features["res2"])
        fpn = lateral + F.interpolate(multi_scale[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fpn = F.relu(self.layer_1(fpn))
        return self.mask_features(fpn), multi_scale
