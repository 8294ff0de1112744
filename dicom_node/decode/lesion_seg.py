"""Reading a received Segmentation (PS3.3 A.51) as a lesion mask on a photo.

Two questions, asked at two times:

* at intake, on the header only (:func:`classify_segmentation`): is this SEG a lesion mask under
  ``[lesion]`` (Segment Label, Segmented Property Category / Type of the Segment Description macro,
  PS3.3 C.8.20.2; or the Series Description), and which photo is it of? The photo is the one
  source image the SEG references: the Derivation Image / Source Image Sequences of the
  per-frame or shared functional groups (PS3.3 C.7.6.16.2.6), else the Referenced Series Sequence
  (C.8.20.3, Common Instance Reference). A SEG of several source images, or of none, is not one
  lesion mask of one photo;
* in the worker (:func:`lesion_mask`): the union of the lesion segments' frames on the photo's
  pixel grid, read with highdicom's public API (``Segmentation.from_dataset``,
  ``get_pixels_by_source_instance``). BINARY and FRACTIONAL (any non-zero value) both count.

A photo has no Frame of Reference, so a SEG of it must match it pixel for pixel (Rows, Columns):
a SEG of another size is refused as a job failure rather than resampled, since nothing says how
its grid lies on the photo.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage

from dicom_node.config import LesionSettings

SEGMENTATION_SOP_CLASS: str = SegmentationStorage
# What the SEG reader takes: uncompressed only (BINARY pixel data cannot be compressed anyway,
# PS3.5 8.2; FRACTIONAL from other tools nearly always comes uncompressed too).
SEG_TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class LesionSegError(ValueError):
    """The SEG cannot be read as a lesion mask of its photo; the message says why."""


@dataclass(frozen=True)
class SegClassification:
    """What intake learns from a SEG's header."""

    is_lesion: bool
    photo_uid: str | None  # the one source image, when there is exactly one
    segments: tuple[int, ...]  # the lesion segments' numbers
    why: str  # for the log: which rule matched, or why none did


def _code_key(item: Dataset) -> str:
    return f"{str(item.get('CodingSchemeDesignator', '')).strip()}:{str(item.get('CodeValue', '')).strip()}"


def _codes(segment: Dataset) -> set[str]:
    found = set()
    for keyword in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
        for item in segment.get(keyword, None) or []:
            found.add(_code_key(item))
    return found


def lesion_segments(ds: Dataset, settings: LesionSettings) -> tuple[tuple[int, ...], str]:
    """The numbers of the segments that are lesions under ``settings``, and which rule said so."""
    segments = list(ds.get("SegmentSequence", None) or [])
    numbers = [int(s.SegmentNumber) for s in segments if "SegmentNumber" in s]
    pattern = settings.series_description_pattern
    if pattern and re.search(pattern, str(ds.get("SeriesDescription", "") or "")):
        return tuple(numbers), "series description"
    wanted = {c.replace(" ", "") for c in settings.property_codes}
    label_pattern = re.compile(settings.segment_label_pattern) if settings.segment_label_pattern else None
    chosen: list[int] = []
    rules: set[str] = set()
    for segment in segments:
        if "SegmentNumber" not in segment:
            continue
        if _codes(segment) & wanted:
            chosen.append(int(segment.SegmentNumber))
            rules.add("property code")
        elif label_pattern is not None and label_pattern.search(str(segment.get("SegmentLabel", "") or "")):
            chosen.append(int(segment.SegmentNumber))
            rules.add("segment label")
    why = "+".join(sorted(rules)) if chosen else "no segment label, property code or series description matches"
    return tuple(chosen), why


def _image_references(ds: Dataset) -> Iterable[Dataset]:
    """Every image reference a SEG gives for its source (PS3.3 C.7.6.16.2.6, C.8.20.3)."""
    groups = list(ds.get("PerFrameFunctionalGroupsSequence", None) or [])
    groups += list(ds.get("SharedFunctionalGroupsSequence", None) or [])
    for group in groups:
        for derivation in group.get("DerivationImageSequence", None) or []:
            yield from derivation.get("SourceImageSequence", None) or []
    yield from ds.get("SourceImageSequence", None) or []
    for series in ds.get("ReferencedSeriesSequence", None) or []:
        yield from series.get("ReferencedInstanceSequence", None) or []


def source_photo_uid(ds: Dataset) -> str | None:
    """The SOP Instance UID of the one image the SEG is of; None for none or several."""
    uids = {str(ref.ReferencedSOPInstanceUID).strip() for ref in _image_references(ds)
            if "ReferencedSOPInstanceUID" in ref}
    return uids.pop() if len(uids) == 1 else None


def classify_segmentation(ds: Dataset, settings: LesionSettings) -> SegClassification:
    """Intake's look at a SEG header: lesion mask or not, and of which photo."""
    segments, why = lesion_segments(ds, settings)
    return SegClassification(bool(segments), source_photo_uid(ds), segments, why)


def lesion_mask(ds: Dataset, photo_uid: str, rows: int, columns: int, settings: LesionSettings) -> np.ndarray:
    """bool (rows, columns): the union of the SEG's lesion segments on the photo ``photo_uid``.

    Raises :class:`LesionSegError` when the SEG is not of that photo, has no lesion segment, or is
    not pixel for pixel on it.
    """
    import highdicom as hd

    segments, why = lesion_segments(ds, settings)
    if not segments:
        raise LesionSegError(f"the SEG has no lesion segment ({why})")
    if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
        raise LesionSegError(
            f"the SEG is {ds.Columns}x{ds.Rows} but the photo is {columns}x{rows}: a photo has no Frame of "
            "Reference, so a lesion SEG must match it pixel for pixel")
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[photo_uid], segment_numbers=list(segments), combine_segments=False,
            ignore_spatial_locations=True, assert_missing_frames_are_empty=True, rescale_fractional=True)
    except Exception as exc:  # highdicom's reasons (no frame for the source, bad encoding) are the SEG's
        raise LesionSegError(f"cannot read the SEG's lesion segments: {type(exc).__name__}: {exc}") from exc
    # (1, rows, columns, segments): one source frame, one channel per requested segment
    mask = np.asarray(pixels)[0] > 0
    return np.asarray(np.any(mask, axis=-1), dtype=bool)
