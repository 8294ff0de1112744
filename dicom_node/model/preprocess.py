"""The official pipeline's input preparation, as pure functions.

Matches ImageHumanParsingPipeline + M2FP.forward bit for bit (see the parity fixture's README):
shorter side to 640 (longer at most 1333) with Pillow's antialiased bilinear, normalise in RGB,
pad bottom/right with 0 after normalising to a multiple of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PreparedImage:
    tensor: torch.Tensor  # (1, 3, padded_h, padded_w) float32
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def padded_hw(self) -> tuple[int, int]:
        return (int(self.tensor.shape[2]), int(self.tensor.shape[3]))


def target_size(height: int, width: int, min_size: int = 640, max_size: int = 1333) -> tuple[int, int]:
    """(h, w) the network sees: detectron2's ResizeShortestEdge rule, rounding with int(x + 0.5)."""
    scale = min_size / min(height, width)
    if height < width:
        new_h, new_w = float(min_size), scale * width
    else:
        new_h, new_w = scale * height, float(min_size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_rgb(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Pillow bilinear (a triangle filter that widens when shrinking), as torchvision's Resize on a PIL image."""
    if rgb.shape[:2] == size_hw:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR))


def prepare_image(rgb: np.ndarray, min_size: int = 640, max_size: int = 1333, size_divisibility: int = 32,
                  pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
                  pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)) -> PreparedImage:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    nh, nw = target_size(h, w, min_size, max_size)
    resized = resize_rgb(rgb, (nh, nw))
    ph = -(-nh // size_divisibility) * size_divisibility
    pw = -(-nw // size_divisibility) * size_divisibility
    tensor = torch.zeros((1, 3, ph, pw), dtype=torch.float32)
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    chw = torch.from_numpy(np.require(resized, requirements=["C", "W"])).permute(2, 0, 1).float()
    tensor[0, :, :nh, :nw] = (chw - mean) / std
    return PreparedImage(tensor, (h, w), (nh, nw))
