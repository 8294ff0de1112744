"""M2FP wired together: backbone -> pixel decoder -> masked-attention decoder.

The module tree mirrors the official checkpoint (``backbone``, ``sem_seg_head.pixel_decoder``,
``sem_seg_head.predictor``), so ``state_dict()`` has exactly the official keys and shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_node.model.backbone import ConvNorm, ResNetBackbone
from dicom_node.model.config import M2FPConfig
from dicom_node.model.pixel_decoder import MSDeformAttnPixelDecoder
from dicom_node.model.transformer_decoder import MaskedAttentionDecoder


class SemSegHead(nn.Module):
    def __init__(self, cfg: M2FPConfig, in_channels: dict[str, int]) -> None:
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, in_channels)
        self.predictor = MaskedAttentionDecoder(cfg.decoder)


class M2FP(nn.Module):
    def __init__(self, cfg: M2FPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.backbone)
        self.sem_seg_head = SemSegHead(cfg, self.backbone.out_channels)
        self.channels_last = False

    def prepare_for_inference(self) -> M2FP:
        """Eval mode, BatchNorm folded into the backbone convs, NHWC backbone (oneDNN's fast layout).

        Changes the module tree (the folded norms disappear), so call it after loading the
        checkpoint, never before saving one.
        """
        self.eval()
        for module in self.backbone.modules():
            if isinstance(module, ConvNorm):
                module.fuse_norm_()
        # Module.to takes memory_format at run time; torch's overloads leave it out of the stub
        self.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.channels_last = True
        return self

    def forward(self, images: torch.Tensor, with_aux: bool = False) -> dict[str, torch.Tensor]:
        """images: normalised, padded (N, 3, H, W) with H, W multiples of 32."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.heads(self.backbone(images), with_aux=with_aux)

    def heads(self, features: dict[str, torch.Tensor], with_aux: bool = False) -> dict[str, torch.Tensor]:
        """Pixel decoder and transformer decoder on the backbone's res2..res5: where a runtime
        with its own backbone (int8) joins the shared network."""
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(features)
        return self.sem_seg_head.predictor(multi_scale, mask_features, with_aux=with_aux)
