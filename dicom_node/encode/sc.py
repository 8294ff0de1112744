"""The colour overlay as a Secondary Capture Image (PS3.3 A.8.1): the result every viewer shows.

The overlay (photo with the class colours blended in, usually with a legend) is made elsewhere
(``dicom_node.parse.render``) and handed in as an RGB array; this module only wraps it:

- ImageType DERIVED\\SECONDARY, Burned In Annotation YES (the legend and colours are pixels),
  a Series Description and Image Comments that say it is an AI overlay not for diagnosis.
- Lossy Image Compression (C.7.6.1.1.5): "01" with the photo's ratios and methods when the
  photo was lossy (once lossy, always lossy), plus our own JPEG step when ``sc_jpeg`` is set.
- References the photo in Source Image Sequence (C.7.6.1, purpose "Source image for image
  processing operation", CID 7202) and Referenced Image Sequence.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_node.encode.common import (
    check_photo,
    content_datetime,
    copy_body_context,
    copy_patient_study,
    equipment_kwargs,
    lossy_compression_history,
    new_uid,
    set_content_datetime,
    set_lossy_compression,
    set_sc_laterality,
)
from dicom_node.encode.options import EncodeOptions
from dicom_node.parse.result import ParsingResult

JPEG_METHOD = "ISO_10918_1"  # C.7.6.1.1.5.1 Defined Term for JPEG lossy compression
DERIVATION_DESCRIPTION = "M2FP human parsing: class colours alpha-blended over the photograph, with legend"


def _code_item(code) -> Dataset:
    return hd.sr.CodedConcept.from_code(code)


def _image_reference(photo_ds: Dataset, purpose=None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = photo_ds.SOPClassUID
    item.ReferencedSOPInstanceUID = photo_ds.SOPInstanceUID
    if purpose is not None:
        item.PurposeOfReferenceCodeSequence = [_code_item(purpose)]
    return item


def image_comments(result: ParsingResult) -> str:
    """Image Comments (LT) of the overlay: what it is, and that it is not for diagnosis."""
    text = "AI-generated body-part overlay (M2FP human parsing). Not for diagnostic use."
    if result.model_untrained:
        text += " Produced with UNTRAINED model weights: colours carry no meaning."
    return text


def build_overlay_sc(
    photo_ds: Dataset,
    overlay_rgb: np.ndarray,
    result: ParsingResult,
    options: EncodeOptions | None = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture of ``overlay_rgb`` (uint8, rows x columns x 3, RGB).

    The overlay may differ in size from the photo (a legend band, say); it is stored as given.
    With ``options.sc_jpeg`` it is JPEG Baseline compressed (YBR_FULL_422, PS3.5 8.2.1),
    otherwise uncompressed RGB in Explicit VR Little Endian.
    """
    options = options or EncodeOptions()
    check_photo(photo_ds)
    overlay_rgb = np.asarray(overlay_rgb)
    if overlay_rgb.dtype != np.uint8 or overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3:
        raise ValueError(
            f"overlay must be uint8 (rows, columns, 3) RGB, got {overlay_rgb.dtype} {overlay_rgb.shape}"
        )
    overlay_rgb = np.ascontiguousarray(overlay_rgb)

    if options.sc_jpeg:
        transfer_syntax, photometric = JPEGBaseline8Bit, "YBR_FULL_422"
    else:
        transfer_syntax, photometric = ExplicitVRLittleEndian, "RGB"
    description = options.sc_series_description
    if result.model_untrained and len(description) <= 64 - len(" [untrained]"):
        description += " [untrained]"

    contributing = []
    try:  # the camera that took the photo, when the photo names it (Manufacturer is Type 2)
        contributing.append(hd.ContributingEquipment.for_image_acquisition(photo_ds))
    except (ValueError, AttributeError, TypeError):
        pass

    when = content_datetime(options)
    sc = hd.sc.SCImage(
        pixel_array=overlay_rgb,
        photometric_interpretation=photometric,
        bits_allocated=8,
        # Only PATIENT or SLIDE exist; PATIENT demands a Patient Orientation, which is replaced
        # below by the photo's own value (a photograph's orientation is usually unknown).
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("A", "F"),
        study_instance_uid=photo_ds.StudyInstanceUID,
        series_instance_uid=new_uid(options),
        series_number=options.sc_series_number,
        sop_instance_uid=new_uid(options),
        instance_number=1,
        **equipment_kwargs(options),
        series_description=description,
        transfer_syntax_uid=transfer_syntax,
        contributing_equipment=contributing or None,
        content_date=when.date(),
        content_time=when.time(),
    )
    copy_patient_study(photo_ds, sc)
    copy_body_context(photo_ds, sc)
    # General Series Laterality (Type 2C, paired body parts): the photo's, empty or absent.
    set_sc_laterality(photo_ds, sc)
    sc.PatientOrientation = photo_ds.get("PatientOrientation", "")  # General Image, Type 2C

    # SC Equipment (C.8.6.1): made by software on a workstation from an existing image.
    sc.ConversionType = "WSD"
    # General Image (C.7.6.1).
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = image_comments(result)
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    sc.DerivationCodeSequence = [_code_item(codes.cid7203.SegmentationImageDerivation)]
    sc.SourceImageSequence = [
        _image_reference(photo_ds, codes.cid7202.SourceImageForImageProcessingOperation)
    ]
    sc.ReferencedImageSequence = [_image_reference(photo_ds)]
    if "RecognizableVisualFeatures" in photo_ds:
        sc.RecognizableVisualFeatures = photo_ds.RecognizableVisualFeatures

    history = lossy_compression_history(photo_ds)
    if options.sc_jpeg:
        ratios, methods = history if history is not None else ([], [])
        uncompressed = overlay_rgb.size  # 8-bit samples
        ratio = f"{uncompressed / max(len(sc.PixelData), 1):.2f}"
        history = ([*ratios, ratio] if len(ratios) == len(methods) else [], [*methods, JPEG_METHOD])
    set_lossy_compression(sc, history)
    set_content_datetime(sc, when)
    # highdicom's SCImage assigns DA/TM objects here, so mypy takes those for the attributes' types;
    # pydicom takes a string for any DA/TM element, and the string keeps the ".%f" form of the
    # other times (TM of a time drops a zero fraction).
    sc.DateOfSecondaryCapture = when.strftime("%Y%m%d")  # type: ignore[assignment]
    sc.TimeOfSecondaryCapture = when.strftime("%H%M%S.%f")  # type: ignore[assignment]
    return sc
