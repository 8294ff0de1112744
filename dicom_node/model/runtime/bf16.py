"""Eager PyTorch under bf16 autocast, with deformable-attention sampling kept in fp32.

On a CPU with native bf16 (AVX512_BF16, AMX) oneDNN runs the backbone's convolutions and the
transformer's matrix products in bf16 at up to twice the fp32 rate. Two things stay in fp32:

* where deformable attention samples: the sampling-offset projection (its offsets are pixel
  coordinates up to ~200, where bf16's 8 significant bits would move a point by up to half a
  pixel) and the sampler itself (``MSDeformAttn`` hands it fp32 values, points and weights; its
  ``embedding_bag`` takes one dtype for table and weights). The value, attention-weight and
  output projections are ordinary matrix products and run in bf16: keeping each
  ``MSDeformAttn`` whole in fp32 (this runtime's first version) cost 1.48x against 1.74x over
  eager (scripts/agreement_noise.py, 1024x768, Zen 4), and both pass the agreement rule;
* the outputs, cast back to fp32 for the postprocess.

The model is shared with the eager reference, so nothing is changed on it for good: the fp32
islands are forward hooks that exist only during this runtime's forward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dicom_node.model.m2fp import M2FP
from dicom_node.model.ms_deform_attn import MSDeformAttn
from dicom_node.model.runtime.base import NetworkOutput, NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cpu import native_bf16_refusal


class _Fp32Islands:
    """Forward hooks that run chosen modules with autocast off and fp32 inputs."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self._open: list[Any] = []

    def _enter(self, module: nn.Module, args: tuple) -> tuple:
        ctx = torch.autocast("cpu", enabled=False)
        ctx.__enter__()
        self._open.append(ctx)
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self._open.pop().__exit__(None, None, None)
        return output

    @contextlib.contextmanager
    def active(self):
        handles = [h for m in self.modules
                   for h in (m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            while self._open:  # an exception inside an island left it open
                self._open.pop().__exit__(None, None, None)


class EagerBf16Runtime(NetworkRuntime):
    name = "eager-bf16"
    precision = "bf16 autocast, deformable attention in fp32"

    def __init__(self, model: M2FP) -> None:
        super().__init__()
        refusal = native_bf16_refusal()
        if refusal:
            raise RuntimeUnavailable(refusal)
        if not torch.backends.mkldnn.is_available():
            raise RuntimeUnavailable("this PyTorch build has no oneDNN (mkldnn) for bf16 kernels")
        self.model = model
        self.islands = _Fp32Islands([m.sampling_offsets for m in model.modules() if isinstance(m, MSDeformAttn)])

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        with torch.inference_mode(), self.islands.active(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(images)
        return NetworkOutput(out["pred_logits"].float(), out["pred_masks"].float())
