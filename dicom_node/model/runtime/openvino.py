"""The network as an OpenVINO graph, one per padded input shape, exported once and kept on disk.

The export traces the native model at one input shape. Shapes are baked into that trace (level
sizes, reference points, resize targets), so a graph is never reshaped to another size, which
would give wrong answers: each padded shape gets its own graph, exported on first use (about
40 s for the full model here; the time is logged and reported) and read back in ~3 s later.
Inputs are padded to multiples of 32, so a camera's photos (4:3, 3:2, 16:9, either way up) need
a handful of graphs.

Weights stay fp32 (``compress_to_fp16=False``) and so does inference
(``INFERENCE_PRECISION_HINT=f32``): OpenVINO would otherwise pick bf16 on CPUs that have it.
``openvino-bf16`` compiles the same graphs with ``INFERENCE_PRECISION_HINT=bf16`` (the CPU
plugin keeps the ops it cannot run in bf16 in fp32); it is offered only on CPUs with native bf16
(:mod:`.cpu`) and, like every candidate, used only when it passes the agreement check.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dicom_node.logs import fields
from dicom_node.model.m2fp import M2FP
from dicom_node.model.runtime.base import NetworkOutput, NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import graph_stem, locked

log = logging.getLogger(__name__)


class _Traced(nn.Module):
    """The model with a tuple output, which is what the converter traces."""

    def __init__(self, model: M2FP) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


class OpenVinoRuntime(NetworkRuntime):
    name = "openvino"
    cache_family = "openvino"  # the exported graphs, whatever the inference precision
    inference_precision = "f32"

    def __init__(self, model: M2FP, digest: str, cache_dir: Path, threads: int | None) -> None:
        super().__init__()
        # OpenVINO's converter sends usage analytics to Google unless a consent file in $HOME says
        # no. A hospital node never phones home: with the module blocked, the converter falls back
        # to its own no-op stub (checked by tests/test_runtime.py).
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
        try:
            import openvino
        except ImportError as exc:
            raise RuntimeUnavailable("the openvino package is not installed") from exc
        self._ov = openvino
        self.model, self.digest, self.cache_dir = model, digest, cache_dir
        self.core = openvino.Core()
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                       "INFERENCE_PRECISION_HINT": self.inference_precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled: dict[tuple[int, int], Any] = {}

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        self.last_export_s = None
        hw = (int(images.shape[2]), int(images.shape[3]))
        compiled = self._compiled.get(hw) or self._load(hw)
        result = compiled([images.contiguous().numpy()])
        return NetworkOutput(torch.from_numpy(result[0]), torch.from_numpy(result[1]))

    def clear_cache(self) -> None:
        """Delete this model's exported graphs (about 250 MB each): used when ``auto`` rejects
        the runtime, whose decision is kept, so they would never be read."""
        self._compiled.clear()
        for path in self.cache_dir.glob(f"{self.cache_family}-{self.digest[:16]}-*"):
            path.unlink(missing_ok=True)

    def graph_path(self, padded_hw: tuple[int, int]) -> Path:
        return self.cache_dir / f"{graph_stem(self.cache_family, self.digest, padded_hw)}.xml"

    def _load(self, hw: tuple[int, int]) -> Any:
        xml = self.graph_path(hw)
        with locked(self.cache_dir, xml.stem):  # one process exports, the others wait and read
            if not xml.exists():
                self.last_export_s = self._export(hw, xml)
        try:
            compiled = self.core.compile_model(self.core.read_model(str(xml)), "CPU", self.config)
        except Exception as exc:
            raise RuntimeUnavailable(f"OpenVINO cannot compile {xml.name}: {exc}") from exc
        self._compiled[hw] = compiled
        return compiled

    def _export(self, hw: tuple[int, int], xml: Path) -> float:
        started = time.perf_counter()
        log.info(fields(event="runtime.export", runtime=self.cache_family, shape=f"{hw[0]}x{hw[1]}",
                        model=self.digest[:16], note="first photo of this padded size; cached afterwards"))
        example = torch.zeros((1, 3, *hw), dtype=torch.float32)
        try:
            # The tracer warns that Python-level shape logic is frozen into the trace: that is
            # the point (one graph per shape), so the warnings say nothing to the operator.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = self._ov.convert_model(_Traced(self.model).eval(), example_input=(example,),
                                               input=[1, 3, *hw])
        except Exception as exc:
            raise RuntimeUnavailable(f"OpenVINO cannot convert the model at {hw}: {exc}") from exc
        # Write beside the final name, then rename: a crash leaves no half graph under it.
        staging = self.cache_dir / f".tmp-{xml.stem}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            self._ov.save_model(graph, str(staging / "graph.xml"), compress_to_fp16=False)
            os.replace(staging / "graph.bin", xml.with_suffix(".bin"))
            os.replace(staging / "graph.xml", xml)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.perf_counter() - started
        log.info(fields(event="runtime.exported", runtime=self.cache_family, shape=f"{hw[0]}x{hw[1]}",
                        seconds=f"{seconds:.1f}", graph=xml.name))
        return seconds


class OpenVinoBf16Runtime(OpenVinoRuntime):
    """The same graphs, run with bf16 inference precision."""

    name = "openvino-bf16"
    precision = "bf16 inference precision (OpenVINO CPU plugin)"
    inference_precision = "bf16"
