"""ResNet "deeplab" backbone (detectron2 layout): a three-conv stem and the res2..res5 stages.

Module and parameter names follow the official checkpoint (``backbone.stem.conv1.norm.weight``,
``backbone.res4.22.conv3.weight``...), so its state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.model.config import BackboneConfig

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ConvNorm(nn.Conv2d):
    """A bias-free conv followed by its BatchNorm, stored as ``<conv>.norm`` like detectron2's Conv2d."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, dilation: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups,
                         dilation=dilation, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(out_ch)  # nn.Identity once folded (fuse_norm_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))

    @torch.no_grad()
    def fuse_norm_(self) -> None:
        """Fold the frozen BatchNorm into the conv's weight and bias (inference only).

        Saves one full pass over every backbone feature map; the result differs from
        conv-then-BN by float rounding only (~1e-6 relative).
        """
        if not isinstance(self.norm, nn.BatchNorm2d):
            return
        bn = self.norm
        # a BatchNorm2d built with track_running_stats (as every one of the checkpoint's is) has both
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.weight.mul_(scale.view(-1, 1, 1, 1))
        self.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
        self.norm = nn.Identity()


class DeepLabStem(nn.Module):
    """Three 3x3 convs (the first with stride 2) and a 3x3 max-pool: stride 4 overall."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_ch, out_ch // 2, 3, stride=2, padding=1)
        self.conv2 = ConvNorm(out_ch // 2, out_ch // 2, 3, padding=1)
        self.conv3 = ConvNorm(out_ch // 2, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        x = F.relu_(self.conv3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, bottleneck_ch: int, out_ch: int, stride: int, groups: int,
                 stride_in_1x1: bool) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_ch, out_ch, 1, stride=stride) if in_ch != out_ch else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_ch, bottleneck_ch, 1, stride=s1)
        self.conv2 = ConvNorm(bottleneck_ch, bottleneck_ch, 3, stride=s3, padding=1, groups=groups)
        self.conv3 = ConvNorm(bottleneck_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out)


class ResNetBackbone(nn.Module):
    """Returns the feature maps res2..res5 (strides 4, 8, 16, 32)."""

    stage_names = ("res2", "res3", "res4", "res5")

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"backbone depth {cfg.depth} is not one of {sorted(BLOCKS_PER_STAGE)}")
        self.stem = DeepLabStem(3, cfg.stem_out_channels)
        in_ch = cfg.stem_out_channels
        out_ch = cfg.res2_out_channels
        bottleneck_ch = cfg.num_groups * cfg.width_per_group
        self.out_channels: dict[str, int] = {}
        for i, (name, n_blocks) in enumerate(zip(self.stage_names, BLOCKS_PER_STAGE[cfg.depth], strict=True)):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(Bottleneck(in_ch, bottleneck_ch, out_ch, stride, cfg.num_groups, cfg.stride_in_1x1))
                in_ch = out_ch
            self.add_module(name, nn.Sequential(*blocks))
            self.out_channels[name] = out_ch
            out_ch *= 2
            bottleneck_ch *= 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        features = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            features[name] = x
        return features
