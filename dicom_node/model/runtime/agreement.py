"""Does a runtime give the eager fp32 answer? Measured on the parity fixture's two images.

A runtime is accepted only if, on both reference images, its label map equals the fp32 one on
at least 99.5 % of pixels and it keeps every instance of the fp32 result (same query and class)
with a mask IoU of at least 0.95 (issue 5's acceptance rule). Both results go through the same
exact postprocess, so only the network differs. The check also times both runtimes on the same
inputs, which is what "the fastest runtime that passes" is chosen by.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
import torch
from PIL import Image

from dicom_node.model.postprocess import PostprocessOutput, postprocess
from dicom_node.model.preprocess import PreparedImage, prepare_image
from dicom_node.model.runtime.base import NetworkOutput, NetworkRuntime

LABEL_AGREEMENT_MIN = 0.995
INSTANCE_IOU_MIN = 0.95
TIMED_RUNS = 2  # after the first call (which may export a graph)
REFERENCE_IMAGES = ("landscape_1024x768.png", "portrait_480x640.png")


def reference_images() -> list[np.ndarray]:
    """The parity fixture's images (a 1024x768 landscape and an upscaled 480x640 portrait)."""
    folder = resources.files("dicom_node.model.runtime") / "reference_images"
    images = []
    for name in REFERENCE_IMAGES:
        with (folder / name).open("rb") as fh, Image.open(fh) as img:
            images.append(np.asarray(img.convert("RGB")))
    return images


@dataclass(frozen=True)
class Agreement:
    runtime: str
    passed: bool
    label_agreement: float  # the lower of the two images
    min_instance_iou: float  # over every fp32 instance; 0 for one the runtime lost
    lost_instances: int
    fp32_instances: int
    network_s: float  # the runtime's median network time, summed over the two images
    eager_network_s: float  # the same for the eager fp32 reference, measured in the same check
    export_s: float | None  # graph export time, when the check had to export

    @property
    def speedup(self) -> float:
        return self.eager_network_s / self.network_s if self.network_s > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"label agreement {self.label_agreement * 100:.3f} % (>= {LABEL_AGREEMENT_MIN * 100:.1f} %), "
                f"min instance IoU {self.min_instance_iou:.4f} (>= {INSTANCE_IOU_MIN}), "
                f"{self.lost_instances} of {self.fp32_instances} instances lost, "
                f"network {self.network_s:.2f} s vs eager {self.eager_network_s:.2f} s ({self.speedup:.2f}x)")


def _timed(runtime: NetworkRuntime, tensor: torch.Tensor, runs: int) -> tuple[NetworkOutput, float, float | None]:
    out = runtime.forward(tensor)  # warm-up; may export a graph
    export_s = runtime.last_export_s
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        out = runtime.forward(tensor)
        times.append(time.perf_counter() - started)
    return out, statistics.median(times), export_s


def _post(out: NetworkOutput, prepared: PreparedImage, human_class: int) -> PostprocessOutput:
    return postprocess(out.pred_logits[0], out.pred_masks[0], prepared.padded_hw, prepared.resized_hw,
                       prepared.original_hw, human_class)


def _instance_masks(post: PostprocessOutput) -> dict[tuple[int, int], np.ndarray]:
    masks = {(h.query_index, h.class_id): m for h, m in zip(post.humans, post.human_masks, strict=True)}
    for part in post.parts:
        masks[(part.query_index, part.class_id)] = post.upsampler.full_mask(part.query_index)
    return masks


@dataclass
class ReferenceRun:
    """The eager fp32 results on the reference images, computed once and compared to every candidate."""

    prepared: list[PreparedImage]
    posts: list[PostprocessOutput]
    masks: list[dict[tuple[int, int], np.ndarray]]
    network_s: float
    human_class: int


def reference_run(reference: NetworkRuntime, prepare_kwargs: dict, human_class: int,
                  images: list[np.ndarray] | None = None, timed_runs: int = TIMED_RUNS) -> ReferenceRun:
    prepared, posts, masks, seconds = [], [], [], 0.0
    for rgb in images if images is not None else reference_images():
        image = prepare_image(rgb, **prepare_kwargs)
        out, network_s, _ = _timed(reference, image.tensor, timed_runs)
        post = _post(out, image, human_class)
        prepared.append(image)
        posts.append(post)
        masks.append(_instance_masks(post))
        seconds += network_s
    return ReferenceRun(prepared, posts, masks, seconds, human_class)


def check_agreement(candidate: NetworkRuntime, reference: ReferenceRun, timed_runs: int = TIMED_RUNS) -> Agreement:
    """Run the candidate on the reference images and compare what the node would report."""
    label_agreement, min_iou, lost, total = 1.0, 1.0, 0, 0
    network_s = 0.0
    export_s: float | None = None
    for image, ref_post, ref_masks in zip(reference.prepared, reference.posts, reference.masks, strict=True):
        out, seconds, exported = _timed(candidate, image.tensor, timed_runs)
        network_s += seconds
        if exported is not None:
            export_s = (export_s or 0.0) + exported
        post = _post(out, image, reference.human_class)
        label_agreement = min(label_agreement, float((ref_post.label_map == post.label_map).mean()))
        masks = _instance_masks(post)
        total += len(ref_masks)
        for key, mask in ref_masks.items():
            other = masks.get(key)
            if other is None:
                lost += 1
                min_iou = 0.0
                continue
            union = int(np.count_nonzero(mask | other))
            iou = int(np.count_nonzero(mask & other)) / union if union else 1.0
            min_iou = min(min_iou, iou)
    passed = label_agreement >= LABEL_AGREEMENT_MIN and min_iou >= INSTANCE_IOU_MIN and lost == 0
    return Agreement(candidate.name, passed, label_agreement, min_iou, lost, total, network_s, reference.network_s,
                     export_s)
