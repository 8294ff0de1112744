"""Sine position embedding of DETR/Mask2Former, normalised to the feature map's extent."""

from __future__ import annotations

import math

import torch


def sine_position_embedding(height: int, width: int, num_pos_feats: int, *, device: torch.device | None = None,
                            temperature: float = 10000.0) -> torch.Tensor:
    """(1, 2*num_pos_feats, H, W): y features then x features, sin/cos interleaved.

    Without a padding mask the cumulative sums of the reference code are just 1..H and 1..W;
    the arithmetic below keeps its operation order so the values match it bit for bit.
    """
    scale = 2 * math.pi
    eps = 1e-6
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y_embed = y_embed / (y_embed[-1:] + eps) * scale
    x_embed = x_embed / (x_embed[-1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_y = y_embed[:, None] / dim_t  # (H, F)
    pos_x = x_embed[:, None] / dim_t  # (W, F)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = pos_y.t()[:, :, None].expand(num_pos_feats, height, width)
    pos_x = pos_x.t()[:, None, :].expand(num_pos_feats, height, width)
    return torch.cat((pos_y, pos_x), dim=0).unsqueeze(0)
