"""The DICOM Segmentation (PS3.3 A.51, C.8.20) of a parsed photograph.

Form, chosen for what viewers can load (see the project's interop notes):

- BINARY, uncompressed (Explicit VR Little Endian): every viewer that reads SEG reads this.
- Pixel for pixel with the photo, one frame per segment, no Frame of Reference: a VL
  Photographic Image has none, so the SEG's only geometry is "same rows and columns as the
  source image" (C.8.20.2: Derivation Image Sequence references the photo).
- One segment per part class present in the label map (mask = label map == class), then one
  segment per person (type "Entire body", mask = person mask) unless disabled. Segment numbers
  run 1..N without gaps (C.8.20.2.1: BINARY segment numbers start at 1 and increase by 1).
- Every segment carries a Tracking ID and Tracking UID (C.8.20.2); the SR reuses them, which
  is how a measurement group and its segment are known to be the same region (TID 4108).
- Shared Functional Groups carry Pixel Measures (C.7.6.16.2.1) and Plane Orientation (Patient)
  (C.7.6.16.2.4). Without a Frame of Reference the SEG IOD does not require them (A.51.5.1:
  the pixels correspond to the source image's through the Derivation Image Functional Group)
  but allows them, and OHIF draws a SEG only when both are there (it reads Pixel Spacing,
  Spacing Between Slices and Image Orientation (Patient) from the shared groups). Pixel
  Spacing is the photo's own when it has a usable one, else :data:`DEFAULT_PIXEL_SPACING_MM`,
  which is a convention for viewers, not a calibration (docs/conformance-notes.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.encode import codes as codetable
from dicom_node.encode.common import (
    algorithm_identification,
    check_photo,
    check_size,
    content_datetime,
    copy_body_context,
    copy_patient_study,
    equipment_kwargs,
    lossy_compression_history,
    new_uid,
    photo_reference,
    set_content_datetime,
    set_lossy_compression,
)
from dicom_node.encode.options import EncodeOptions
from dicom_node.logs import fields
from dicom_node.parse.classes import HUMAN, class_color
from dicom_node.parse.result import ParsingResult

log = logging.getLogger(__name__)

SEGMENTATION_CONTENT_LABEL = "M2FP_PARSING"  # Content Label (CS, 16 characters)

# Pixel Measures of a SEG whose photo states no Pixel Spacing: one pixel is called 1 mm x 1 mm
# (row spacing, column spacing) so that viewers have a grid to draw on. Not a calibration.
DEFAULT_PIXEL_SPACING_MM: tuple[float, float] = (1.0, 1.0)
# A photo has no slices: Slice Thickness (Type 1 in Pixel Measures when the macro is present for
# a SEG with a single plane) and Spacing Between Slices (which OHIF reads) are a nominal 1 mm.
NOMINAL_SLICE_THICKNESS_MM = 1.0
# Image Orientation (Patient) of the photo's own pixel grid: rows along +x, columns along +y
# (C.7.6.2.1.1). Without a Frame of Reference it places nothing in the patient; it tells a viewer
# that the SEG's frame lies on the photo as it is, neither flipped nor rotated.
PHOTO_PLANE_ORIENTATION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class PlannedSegment:
    """One segment of the SEG: what it holds and under which number and tracking ID.

    ``person_index`` is None for a part-class segment; for a person segment ``class_index``
    is :data:`~dicom_node.parse.classes.HUMAN`.
    """

    segment_number: int
    class_index: int
    person_index: int | None
    label: str
    tracking_id: str

    @property
    def is_person(self) -> bool:
        return self.person_index is not None

    def mask(self, result: ParsingResult) -> np.ndarray:
        if self.person_index is not None:
            return np.asarray(result.persons[self.person_index].mask, dtype=bool)
        return result.label_map == self.class_index


class _BinarySegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a cheaper overlap test for a stack of boolean masks.

    The stock check sums the (1, rows, columns, segments) stack into an int64 array (about
    0.2 s for a 12-megapixel photo with 9 segments, a fifth of the node's encoding budget). For
    boolean masks, "one or more pixels in more than one segment" (Segments Overlap, C.8.20.2)
    is the same as "the masks' pixel counts add up to more than their union's", which costs
    two cheap passes. Any other input goes to highdicom's own check; a test pins both to the
    same answer.
    """

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type, dtype):
        if (
            isinstance(pixel_array, np.ndarray)
            and pixel_array.dtype == np.bool_
            and pixel_array.ndim == 4
            and pixel_array.shape[-1] == len(segment_numbers)
            and hd.seg.SegmentationTypeValues(segmentation_type) == hd.seg.SegmentationTypeValues.BINARY
        ):
            return pixel_array, segments_overlap(pixel_array)
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)

    def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
        # pydicom's pack_bits proves the planes binary with array_equal(arr, arr.astype(bool)) and
        # copies them to uint8 before packing: 21 ms per 12 MP frame, against 2.5 ms for a max()
        # and np.packbits. Same bits (PS3.5 8.1.1: first pixel in the least significant bit); a
        # length that is not a multiple of 8 (only highdicom's last remainder) goes the stock way.
        if (self.BitsAllocated == 1 and planes.dtype in (np.bool_, np.uint8) and planes.size % 8 == 0
                and (planes.dtype == np.bool_ or not planes.size or int(planes.max()) <= 1)):
            return np.packbits(planes.ravel(), bitorder="little").tobytes()
        return super()._encode_pixels_native(planes)


def photo_pixel_spacing(photo_ds: Dataset) -> tuple[float, float] | None:
    """The photo's Pixel Spacing (0028,0030) in mm (row spacing, column spacing), or None.

    Only Pixel Spacing is taken: it is the one attribute that states a distance on the imaged
    body (PS3.3 10.7.1, possibly calibrated to an object in the picture). Imager Pixel Spacing
    (at a radiographic detector) and Nominal Scanned Pixel Spacing (on a digitised film) measure
    something else and are not used. A value that is not two positive finite numbers is
    ignored with a WARNING line, and the default spacing applies.
    """
    if "PixelSpacing" not in photo_ds:
        return None
    try:
        value = photo_ds["PixelSpacing"].value  # a raw value is converted here, and may fail
        if value in (None, ""):
            return None
        values = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError) as exc:  # one value (not iterable), not a number
        reason = f"not a pair of numbers ({type(exc).__name__})"
    else:
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
        reason = f"{len(values)} values" if len(values) != 2 else "not two positive finite numbers"
    log.warning(fields(event="encode.pixel_spacing_ignored", sop_instance_uid=photo_ds.get("SOPInstanceUID"),
                       reason=reason, used="default"))
    return None


def pixel_measures(photo_ds: Dataset) -> hd.PixelMeasuresSequence:
    """Pixel Measures (C.7.6.16.2.1) for the SEG of ``photo_ds``: its Pixel Spacing or the default."""
    spacing = photo_pixel_spacing(photo_ds) or DEFAULT_PIXEL_SPACING_MM
    return hd.PixelMeasuresSequence(
        pixel_spacing=list(spacing),
        slice_thickness=NOMINAL_SLICE_THICKNESS_MM,
        spacing_between_slices=NOMINAL_SLICE_THICKNESS_MM,
    )


def segments_overlap(masks: np.ndarray) -> hd.seg.SegmentsOverlapValues:
    """Segments Overlap of a boolean (..., segments) stack: YES when a pixel is in two segments."""
    per_segment = sum(int(np.count_nonzero(masks[..., i])) for i in range(masks.shape[-1]))
    union = int(np.count_nonzero(masks.any(axis=-1)))
    return hd.seg.SegmentsOverlapValues.YES if per_segment > union else hd.seg.SegmentsOverlapValues.NO


def plan_segments(
    result: ParsingResult,
    include_person_segments: bool = True,
    classes_present: list[int] | None = None,
) -> list[PlannedSegment]:
    """The segments of ``result``'s SEG, in segment-number order (classes ascending, then persons).

    ``classes_present`` saves counting the label map again when the caller already knows them
    (the classes of ``region_statistics(result).regions``, which are the same by construction).
    """
    if classes_present is None:
        classes_present = result.classes_present()
    planned: list[PlannedSegment] = []
    for class_index in sorted(classes_present):
        coding = codetable.class_coding(class_index)
        planned.append(PlannedSegment(len(planned) + 1, class_index, None, coding.label, coding.label))
    if include_person_segments:
        for person in result.persons:
            label = f"Person {person.index + 1}"
            planned.append(PlannedSegment(len(planned) + 1, HUMAN, person.index, label, label))
    return planned


def display_color(class_index: int) -> hd.color.CIELabColor:
    """Recommended Display CIELab Value (C.8.20.2): the class colour, sRGB -> CIELab (D65)."""
    return hd.color.CIELabColor.from_rgb(*class_color(class_index))


def segment_description(planned: PlannedSegment, result: ParsingResult) -> hd.seg.SegmentDescription:
    """Segment Sequence item (C.8.20.2 Segment Description Macro) for one planned segment."""
    coding = codetable.class_coding(planned.class_index)
    description = hd.seg.SegmentDescription(
        segment_number=planned.segment_number,
        segment_label=planned.label,
        segmented_property_category=coding.category,
        segmented_property_type=coding.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(result),
        tracking_uid=hd.UID(),
        tracking_id=planned.tracking_id,
        display_color=display_color(planned.class_index),
    )
    if coding.modifiers:
        # highdicom has no argument for the Segmented Property Type Modifier Code Sequence
        # (0062,0011); laterality (CID 244) and the garment name go here.
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(code) for code in coding.modifiers
        ]
    return description


def build_segmentation(
    photo_ds: Dataset,
    result: ParsingResult,
    options: EncodeOptions | None = None,
    *,
    classes_present: list[int] | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY SEG of ``result`` on ``photo_ds`` (see the module docstring for its form).

    ``photo_ds`` is the received photo (its pixel data need not be loaded). Raises ValueError
    when the parsing does not match the photo's size or has nothing to segment (no class
    present and no person): a SEG needs at least one segment. ``classes_present`` (the classes
    of ``region_statistics(result).regions``) saves counting the label map once more.
    """
    options = options or EncodeOptions()
    check_photo(photo_ds)
    check_size(photo_ds, result)
    planned = plan_segments(result, options.include_person_segments, classes_present)
    if not planned:
        raise ValueError("the parsing has no part class and no person: a SEG needs at least one segment")

    # (1, Rows, Columns, Segments), filled one contiguous (Rows, Columns) plane per segment.
    rows, columns = result.size_hw
    stack = np.empty((len(planned), rows, columns), dtype=bool)
    for i, segment in enumerate(planned):
        stack[i] = segment.mask(result)
    pixel_array = np.moveaxis(stack, 0, -1)[np.newaxis]

    # The Pixel Measures are given below; highdicom would also read the photo's Pixel Spacing
    # on its own, and fails on a malformed one (one value, a text), so its copy goes without.
    source = photo_reference(photo_ds)
    if "PixelSpacing" in source:
        del source.PixelSpacing
    when = content_datetime(options)
    seg = _BinarySegmentation(
        source_images=[source],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(s, result) for s in planned],
        series_instance_uid=new_uid(options),
        series_number=options.seg_series_number,
        sop_instance_uid=new_uid(options),
        instance_number=1,
        **equipment_kwargs(options),
        content_description="Body parts, clothing and persons (M2FP human parsing)",
        content_label=SEGMENTATION_CONTENT_LABEL,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,  # frame n is segment n, even for an (unlikely) empty person mask
        series_description=options.seg_series_description,
        coding_schemes=[codetable.coding_scheme_identification()],
        content_date=when.date(),
        content_time=when.time(),
        pixel_measures=pixel_measures(photo_ds),
    )
    # highdicom refuses plane_orientation for a source without a Frame of Reference (it wants
    # the SEG aligned through the source image alone), though the SEG IOD allows the macro then
    # (A.51.5.1) and OHIF needs it to draw the SEG: added to the shared groups after construction.
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT, image_orientation=PHOTO_PLANE_ORIENTATION
    )
    copy_patient_study(photo_ds, seg)
    # Body Part Examined only: dciodvfy rejects General Series Laterality (Type 2C, C.7.3.1) on
    # a SEG whatever its value, even empty (see copy_body_context).
    copy_body_context(photo_ds, seg)
    # A photo has no Image Orientation (Patient), so the General Image Module's Patient
    # Orientation (Type 2C) is required; the photo's value (often empty) is the truthful one.
    seg.PatientOrientation = photo_ds.get("PatientOrientation", "")
    # C.8.20.2: a SEG made from a lossy compressed photo says so (Lossy Image Compression "01").
    set_lossy_compression(seg, lossy_compression_history(photo_ds))
    set_content_datetime(seg, when)
    return seg


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Tracking ID -> Segment Number of a SEG (built here or read back from a file)."""
    return {
        str(item.TrackingID): int(item.SegmentNumber) for item in seg.SegmentSequence if "TrackingID" in item
    }


def segment_tracking_uids(seg: Dataset) -> dict[int, str]:
    """Segment Number -> Tracking UID of a SEG."""
    items = [item for item in seg.SegmentSequence if "TrackingUID" in item]
    return {int(item.SegmentNumber): str(item.TrackingUID) for item in items}
