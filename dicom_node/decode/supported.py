"""What the photo decoder reads: SOP classes, transfer syntaxes and the pixel limit.

Kept apart from :mod:`dicom_node.decode.photo` (numpy, Pillow) so that the configuration can
validate ``[intake]`` against these facts without importing a decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import uid

# The photo class a PACS routing rule forwards (modality XC); what intake accepts by default.
PHOTO_SOP_CLASS: str = uid.VLPhotographicImageStorage
# What intake accepts by default: VL Photographic, and Dermoscopic Photography (skin-lesion
# follow-up, one of the node's uses); the other decodable classes only when configured.
DEFAULT_PHOTO_SOP_CLASSES: tuple[str, ...] = (PHOTO_SOP_CLASS, uid.DermoscopicPhotographyImageStorage)
# SOP classes whose pixel forms the decoder handles; accepting anything else would acknowledge
# objects the worker can only fail.
DECODABLE_SOP_CLASSES: frozenset[str] = frozenset({
    uid.VLPhotographicImageStorage,
    # Dermoscopic Photography Image (PS3.3 A.32.11, modality DMS): the same single-frame 8-bit
    # colour photo as VL Photographic, taken through a dermatoscope for skin-lesion follow-up.
    uid.DermoscopicPhotographyImageStorage,
    uid.VLEndoscopicImageStorage,
    uid.VLMicroscopicImageStorage,
    uid.SecondaryCaptureImageStorage,
})
# Transfer syntaxes the decoder reads (with the pinned pylibjpeg/pyjpegls plugins).
DECODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)
# Photos with more pixels are refused before decoding (a 100 MP photo is ~300 MB of RGB).
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class DecodeLimits:
    """What a received photo may be for the decoder to take it (from ``[intake]``)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    sop_classes: frozenset[str] = DECODABLE_SOP_CLASSES
