"""What every inference runtime of the M2FP network offers the parsing engine.

The engine only needs the two tensors the postprocess reads; how they are computed (eager
PyTorch, an exported OpenVINO graph, an int8 backbone) is the runtime's business. Runtimes other
than the eager reference must prove they give the same answer before they are used
(:mod:`dicom_node.model.runtime.agreement`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class RuntimeUnavailable(RuntimeError):
    """A runtime cannot run here (package missing, export failed); the engine uses another."""


@dataclass(frozen=True)
class NetworkOutput:
    pred_logits: torch.Tensor  # (1, Q, K+1)
    pred_masks: torch.Tensor  # (1, Q, H/4, W/4)


class NetworkRuntime(ABC):
    """The network from a normalised, padded image to class and mask logits."""

    name: str = ""
    precision: str = "fp32"
    # Runtimes that share files on disk (the OpenVINO graphs serve fp32 and bf16 inference) name
    # the same family: ``auto`` keeps the family's files when any of its members is chosen.
    cache_family: str = ""

    def __init__(self) -> None:
        self.last_export_s: float | None = None  # set when the last forward had to export a graph

    @abstractmethod
    def forward(self, images: torch.Tensor) -> NetworkOutput:
        """images: (1, 3, H, W), H and W multiples of 32 (what ``prepare_image`` gives)."""

    def clear_cache(self) -> None:
        """Remove what this runtime keeps on disk for the model (nothing, unless it exports)."""
        return None

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"
