"""How far eager fp32 moves from itself when the photo changes imperceptibly: the noise floor the
agreement rule allows (:mod:`.agreement`).

Measured on the model being checked, before its candidates are judged, so a trained model is held
to its own (lower) noise and not to the random-weight constants. ``scripts/agreement_noise.py``
prints the full table over every perturbation; the check runs ``CHECK_PERTURBATIONS``, the two
that a PACS really does to a photo (a lossy re-encode) and that framing does (a pixel's shift),
at the cost of two more eager runs per reference image (~10 s here, once per model, CPU and
package versions: the result is cached with the check's).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
from PIL import Image

from dicom_node.logs import fields
from dicom_node.model.preprocess import prepare_image
from dicom_node.model.runtime.agreement import (
    Difference,
    ReferenceRun,
    Thresholds,
    compare,
    parse_prepared,
    parsing_of,
    reference_images,
)
from dicom_node.model.runtime.base import NetworkRuntime

log = logging.getLogger(__name__)


def jpeg(rgb: np.ndarray, quality: int = 95) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))


def shift(rgb: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved by (dy, dx) pixels (each -1, 0 or 1), the uncovered edge repeated."""
    out = np.roll(rgb, (dy, dx), axis=(0, 1))
    if dy == 1:
        out[0] = rgb[0]
    elif dy == -1:
        out[-1] = rgb[-1]
    if dx == 1:
        out[:, 0] = rgb[:, 0]
    elif dx == -1:
        out[:, -1] = rgb[:, -1]
    return out


def grey(rgb: np.ndarray, step: int) -> np.ndarray:
    return np.clip(rgb.astype(np.int16) + step, 0, 255).astype(np.uint8)


# name -> (how the photo changes, (dy, dx): how far the result must be shifted back)
PERTURBATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int]]] = {
    "jpeg q95": (jpeg, (0, 0)),
    "shift right 1px": (lambda x: shift(x, 0, 1), (0, 1)),
    "shift down 1px": (lambda x: shift(x, 1, 0), (1, 0)),
    "shift left 1px": (lambda x: shift(x, 0, -1), (0, -1)),
    "shift up 1px": (lambda x: shift(x, -1, 0), (-1, 0)),
    "grey +1": (lambda x: grey(x, 1), (0, 0)),
    "grey -1": (lambda x: grey(x, -1), (0, 0)),
}
CHECK_PERTURBATIONS = ("jpeg q95", "shift right 1px")


def overlap(height: int, width: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The windows of the original's and of the shifted result that show the same content."""
    def axis(n: int, d: int) -> tuple[slice, slice]:
        return slice(max(0, -d), n - max(0, d)), slice(max(0, d), n - max(0, -d))

    (ry, oy), (rx, ox) = axis(height, dy), axis(width, dx)
    return (ry, rx), (oy, ox)


def perturbed_differences(eager: NetworkRuntime, reference: ReferenceRun, prepare_kwargs: dict, name: str,
                          images: list[np.ndarray] | None = None) -> list[Difference]:
    """fp32 on each reference image against fp32 on the same image changed by perturbation ``name``
    (a shifted result compared on the overlap)."""
    change, (dy, dx) = PERTURBATIONS[name]
    human = reference.human_class
    differences = []
    for rgb, fp32 in zip(images if images is not None else reference_images(), reference.parsings, strict=True):
        prepared = prepare_image(change(rgb), **prepare_kwargs)
        other = parsing_of(parse_prepared(eager.forward(prepared.tensor), prepared, human), human)
        height, width = fp32.label_map.shape
        ref_win, other_win = overlap(height, width, dy, dx)
        differences.append(compare(fp32.crop(*ref_win), other.crop(*other_win)))
    return differences


def noise_floor(differences: dict[str, list[Difference]]) -> tuple[float, float, float]:
    """(label agreement, unmatched fraction, class share pp): the worst over the perturbations of
    the worse image's label agreement, the instances left unmatched or added over both images per
    fp32 instance, and the largest move of a class's share."""
    label, unmatched, share = 1.0, 0.0, 0.0
    for diffs in differences.values():
        label = min(label, *(d.label_agreement for d in diffs))
        instances = sum(d.fp32_instances for d in diffs)
        worst = max(sum(d.unmatched_fp32 for d in diffs), sum(d.unmatched_other for d in diffs))
        unmatched = max(unmatched, worst / instances if instances else 0.0)
        share = max(share, *(d.class_share_pp for d in diffs))
    return label, unmatched, share


def measure_thresholds(eager: NetworkRuntime, reference: ReferenceRun, prepare_kwargs: dict,
                       names: tuple[str, ...] = CHECK_PERTURBATIONS,
                       images: list[np.ndarray] | None = None) -> Thresholds:
    """The rule's thresholds for this model: its fp32 noise under ``names`` plus the margins."""
    differences = {name: perturbed_differences(eager, reference, prepare_kwargs, name, images) for name in names}
    label, unmatched, share = noise_floor(differences)
    thresholds = Thresholds.from_noise(label, unmatched, share, f"this model's fp32 noise ({', '.join(names)})")
    log.info(fields(event="runtime.noise", perturbations=",".join(names), label_agreement=f"{label * 100:.3f}%",
                    unmatched_fraction=f"{unmatched:.4f}", class_share_pp=f"{share:.3f}",
                    floor=f"{thresholds.label_agreement_floor * 100:.3f}%",
                    unmatched_max=f"{thresholds.unmatched_fraction_max:.4f}",
                    class_share_max=f"{thresholds.class_share_pp_max:.3f}"))
    return thresholds
