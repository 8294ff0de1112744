"""The reference runtime: the native PyTorch M2FP, run eagerly in fp32."""

from __future__ import annotations

import torch

from dicom_node.model.m2fp import M2FP
from dicom_node.model.runtime.base import NetworkOutput, NetworkRuntime


class EagerRuntime(NetworkRuntime):
    name = "eager"

    def __init__(self, model: M2FP) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        with torch.inference_mode():
            out = self.model(images)
        return NetworkOutput(out["pred_logits"], out["pred_masks"])
