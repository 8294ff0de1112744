"""Build DICOM body photographs of every pixel form the node must read, for tests.

Every builder starts from a plain numpy image (use :func:`synthetic_rgb` for a
deterministic one with pure red, green and blue patches) and returns a fresh
pydicom ``Dataset`` with new UIDs, so a PACS such as Orthanc treats each one as
a new instance.  The colour photographs carry the attributes of the VL
Photographic Image IOD (PS3.3 A.33.4) so that ``dciodvfy`` reports no Error
lines for the uncompressed RGB form; the same objects are the sources for the
SEG, SC and SR tests.

Stable API (other tests import it): :func:`synthetic_rgb`, :func:`patch_boxes`,
:func:`make_vl_photo`, :func:`make_grey_photo`, :func:`make_16bit_photo`,
:func:`make_jpeg_photo_with_img2dcm`, :func:`write_dataset` and the corrupting
helpers :func:`truncate_file`, :func:`truncate_pixel_data`,
:func:`drop_pixel_data`, :func:`lie_about_rows`.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
VL_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1"
VL_MICROSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# Modality defined terms required by each IOD (PS3.3 A.32.x, A.8.1)
MODALITY_BY_SOP_CLASS = {
    VL_PHOTOGRAPHIC: "XC",
    VL_ENDOSCOPIC: "ES",
    VL_MICROSCOPIC: "GM",
    SECONDARY_CAPTURE: "OT",
}

# Transfer syntaxes made by pydicom's own ``Dataset.compress`` (encoder plugins:
# pydicom/pylibjpeg-rle for RLE, pyjpegls for JPEG-LS, pylibjpeg-openjpeg for J2K).
PYDICOM_ENCODED = {RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000}
# Transfer syntaxes pydicom cannot encode: made with dcmtk's dcmcjpeg instead.
DCMCJPEG_OPTIONS = {
    JPEGBaseline8Bit: ["+eb"],
    JPEGLosslessSV1: ["+e1"],
    JPEGLossless: ["+el"],
}
LOSSLESS_SYNTAXES = {
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
}

# name -> RGB colour of the flat patches painted by synthetic_rgb
PATCH_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


def patch_boxes(h: int, w: int) -> dict[str, tuple[int, int, int, int]]:
    """Return ``name -> (y0, y1, x0, x1)`` of the cells of :func:`synthetic_rgb`.

    The image is a 2 x 3 grid: red, green, blue on top; white, black and a
    textured gradient ("texture") below.
    """
    ys = [0, h // 2, h]
    xs = [0, w // 3, 2 * w // 3, w]
    names = [["red", "green", "blue"], ["white", "black", "texture"]]
    return {names[r][c]: (ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(2) for c in range(3)}


def inner(box: tuple[int, int, int, int], margin: int = 6) -> tuple[slice, slice]:
    """Slices of the inside of a patch, ``margin`` pixels away from its edges (JPEG ringing)."""
    y0, y1, x0, x1 = box
    return slice(y0 + margin, max(y0 + margin + 1, y1 - margin)), slice(
        x0 + margin, max(x0 + margin + 1, x1 - margin)
    )


def synthetic_rgb(h: int = 96, w: int = 144) -> np.ndarray:
    """A deterministic ``(h, w, 3)`` uint8 test photo with clear red/green/blue patches.

    Flat red, green, blue, white and black cells (see :func:`patch_boxes`) make
    colour-space mistakes obvious; the "texture" cell holds a gradient with
    seeded noise so that any lossless-codec error shows up as a pixel mismatch.
    Cells of at least 32 x 32 pixels (h >= 64, w >= 96) survive JPEG well.
    """
    if h < 2 or w < 3:
        raise ValueError("synthetic_rgb needs h >= 2 and w >= 3")
    img = np.zeros((h, w, 3), dtype=np.uint8)
    boxes = patch_boxes(h, w)
    for name, colour in PATCH_COLOURS.items():
        y0, y1, x0, x1 = boxes[name]
        img[y0:y1, x0:x1] = colour
    y0, y1, x0, x1 = boxes["texture"]
    th, tw = y1 - y0, x1 - x0
    yy, xx = np.mgrid[0:th, 0:tw]
    rng = np.random.default_rng(20240611)
    noise = rng.integers(0, 24, size=(th, tw, 3))
    texture = np.stack(
        [
            40 + (xx * 180) // max(tw - 1, 1),
            40 + (yy * 180) // max(th - 1, 1),
            np.full_like(xx, 128),
        ],
        axis=-1,
    )
    img[y0:y1, x0:x1] = np.clip(texture + noise, 0, 255).astype(np.uint8)
    return img


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _base_dataset(sop_class: str, rows: int, columns: int) -> Dataset:
    """Patient, study, series, equipment, image and SOP common attributes with fresh UIDs."""
    date, time = _now()
    sop_instance_uid = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = "Test^Photo"
    ds.PatientID = "PHOTO-TEST-001"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Body photograph"
    # General Series
    ds.Modality = MODALITY_BY_SOP_CLASS.get(sop_class, "OT")
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Whole body photo"
    # General Equipment
    ds.Manufacturer = "dicom_node tests"
    # General Image / General Acquisition
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = date + time
    ds.BodyPartExamined = "WHOLEBODY"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if sop_class == SECONDARY_CAPTURE:
        # SC Equipment module (PS3.3 C.8.6.1)
        ds.ConversionType = "DI"
    else:
        # Acquisition Context module (PS3.3 C.7.6.14) of the VL IODs: type 2, empty is valid
        ds.AcquisitionContextSequence = []
    # Image Pixel
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def _apply_tags(ds: Dataset, tags: dict[str, object]) -> None:
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _to_ybr_full_422_bytes(ybr: np.ndarray) -> bytes:
    """Native YBR_FULL_422 (PS3.3 C.7.6.3.1.2): Y1 Y2 Cb Cr per horizontal pixel pair."""
    h, w, _ = ybr.shape
    if w % 2:
        raise ValueError("YBR_FULL_422 needs an even number of columns")
    pairs = ybr.reshape(h, w // 2, 2, 3).astype(np.uint16)
    out = np.empty((h, w // 2, 4), dtype=np.uint8)
    out[..., 0] = pairs[:, :, 0, 0]
    out[..., 1] = pairs[:, :, 1, 0]
    out[..., 2] = (pairs[:, :, 0, 1] + pairs[:, :, 1, 1] + 1) // 2
    out[..., 3] = (pairs[:, :, 0, 2] + pairs[:, :, 1, 2] + 1) // 2
    return out.tobytes()


def _dcmcjpeg(ds: Dataset, options: list[str]) -> Dataset:
    """Compress with dcmtk's dcmcjpeg (pydicom has no JPEG process 1/14 encoder)."""
    if shutil.which("dcmcjpeg") is None:
        raise RuntimeError("dcmcjpeg (Debian package dcmtk) is needed for this transfer syntax")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.dcm"
        dst = Path(tmp) / "out.dcm"
        write_dataset(ds, src)
        subprocess.run(["dcmcjpeg", *options, str(src), str(dst)], check=True, capture_output=True)
        out = pydicom.dcmread(dst)
    return out


def make_vl_photo(
    rgb: np.ndarray,
    transfer_syntax: str = ExplicitVRLittleEndian,
    planar_configuration: int = 0,
    photometric: str = "RGB",
    sop_class: str = VL_PHOTOGRAPHIC,
    *,
    jpeg_ycbcr: bool = True,
    **tags: object,
) -> Dataset:
    """Build a single-frame colour photo ``Dataset`` from an ``(H, W, 3)`` uint8 RGB image.

    ``transfer_syntax``: uncompressed (explicit/implicit little endian), RLE
    Lossless, JPEG-LS (lossless/near-lossless), JPEG 2000 (lossless/lossy) via
    ``Dataset.compress``; JPEG Baseline, JPEG Lossless SV1 and JPEG Lossless
    P14 via dcmtk's ``dcmcjpeg``.  ``photometric`` is "RGB", or for
    uncompressed data "YBR_FULL"/"YBR_FULL_422" (pixels converted from ``rgb``),
    or for JPEG 2000 "YBR_ICT" (lossy) / "YBR_RCT" (lossless), where the codec
    applies the colour transform (plain "RGB" J2K is encoded without it).
    JPEG Baseline always gives the usual camera form, YCbCr components labelled
    YBR_FULL_422, unless ``jpeg_ycbcr=False`` (RGB components, labelled RGB).
    ``planar_configuration`` applies to uncompressed and RLE data.  ``tags``
    are keyword=value pairs set last (``None`` deletes an attribute).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("rgb must be an (H, W, 3) uint8 array")
    rows, columns = rgb.shape[:2]
    ts = UID(transfer_syntax)
    ds = _base_dataset(sop_class, rows, columns)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = planar_configuration

    if photometric == "RGB":
        pixels = rgb
    elif photometric in ("YBR_ICT", "YBR_RCT"):
        # the J2K encoder applies the multi-component transform itself (PS3.5 8.2.4)
        if ts not in (JPEG2000, JPEG2000Lossless):
            raise ValueError(f"{photometric} is only valid with JPEG 2000 transfer syntaxes")
        pixels = rgb
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):
        if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            raise ValueError(f"{photometric} builder only makes uncompressed data")
        pixels = convert_color_space(rgb, "RGB", "YBR_FULL")
    else:
        raise ValueError(f"unsupported photometric for a colour photo: {photometric}")

    compressed = ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    if photometric == "YBR_FULL_422":
        ds.PlanarConfiguration = 0
        ds.PixelData = _to_ybr_full_422_bytes(pixels)
    elif planar_configuration == 1 and not compressed:
        ds.PixelData = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB"
    if compressed:
        # encoders read interleaved input; for RLE the attribute is then only a label, since
        # RLE segments are always colour-by-plane (PS3.5 G.2), and readers must cope with 1
        ds.PlanarConfiguration = 0

    if not compressed:
        ds.file_meta.TransferSyntaxUID = ts
    elif ts in PYDICOM_ENCODED:
        kwargs: dict[str, object] = {}
        if ts == JPEGLSNearLossless:
            kwargs["jls_error"] = 2
        elif ts == JPEG2000:
            kwargs["j2k_cr"] = [20]
        ds.compress(ts, generate_instance_uid=False, **kwargs)
    elif ts in DCMCJPEG_OPTIONS:
        options = DCMCJPEG_OPTIONS[ts] + ([] if jpeg_ycbcr else ["+cr"])
        ds = _dcmcjpeg(ds, options)
    else:
        raise ValueError(f"no test encoder for transfer syntax {ts} ({ts.name})")

    if ts not in LOSSLESS_SYNTAXES:
        ds.LossyImageCompression = "01"
    if compressed and "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = planar_configuration
    _apply_tags(ds, tags)
    return ds


def make_grey_photo(
    grey: np.ndarray,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = VL_PHOTOGRAPHIC,
    **tags: object,
) -> Dataset:
    """Build a single-sample photo whose *displayed* intensities are ``grey`` ((H, W) uint8).

    For MONOCHROME1 the stored values are ``255 - grey`` so that a correct
    reader (which inverts MONOCHROME1) gets ``grey`` back.  Note that the VL
    Image module only allows MONOCHROME2; MONOCHROME1 is for robustness tests
    (use ``sop_class=SECONDARY_CAPTURE`` for a valid object).
    """
    grey = np.asarray(grey)
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError("grey must be an (H, W) uint8 array")
    ds = _base_dataset(sop_class, *grey.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    stored = 255 - grey if photometric == "MONOCHROME1" else grey
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OB"
    ts = UID(transfer_syntax)
    if ts in PYDICOM_ENCODED:
        ds.compress(ts, generate_instance_uid=False)
    elif ts in DCMCJPEG_OPTIONS:
        ds = _dcmcjpeg(ds, DCMCJPEG_OPTIONS[ts])
    else:
        ds.file_meta.TransferSyntaxUID = ts
    _apply_tags(ds, tags)
    return ds


def make_16bit_photo(
    image: np.ndarray, bits_stored: int = 16, sop_class: str = VL_PHOTOGRAPHIC, **tags: object
) -> Dataset:
    """Build an uncompressed 16-bit photo from ``(H, W)`` (MONOCHROME2) or ``(H, W, 3)`` (RGB) values."""
    image = np.asarray(image)
    ds = _base_dataset(sop_class, image.shape[0], image.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    if image.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(image.astype("<u2")).tobytes()
    ds["PixelData"].VR = "OW"
    _apply_tags(ds, tags)
    return ds


def make_jpeg_photo_with_img2dcm(rgb: np.ndarray, tmp_path: Path, quality: int = 95) -> Path:
    """Write ``rgb`` as a JPEG with Pillow and wrap it with ``img2dcm -vlp``.

    Returns the path of a JPEG Baseline (YBR_FULL_422) VL Photographic Image
    with fresh UIDs, as a camera-to-PACS gateway would make it.  The JPEG
    itself is kept beside it as ``<name>.jpg``.
    """
    if shutil.which("img2dcm") is None:
        raise RuntimeError("img2dcm (Debian package dcmtk) is needed")
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    stem = "img2dcm_" + generate_uid(prefix=None).replace(".", "")[-12:]
    jpg = tmp_path / f"{stem}.jpg"
    out = tmp_path / f"{stem}.dcm"
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), "RGB").save(jpg, quality=quality)
    subprocess.run(
        [
            "img2dcm",
            "-vlp",
            "-k",
            "BodyPartExamined=WHOLEBODY",
            "-k",
            "PatientName=Test^Photo",
            "-k",
            "PatientID=PHOTO-TEST-001",
            "-k",
            "Modality=XC",
            "-k",
            f"StudyInstanceUID={generate_uid()}",
            "-k",
            f"SeriesInstanceUID={generate_uid()}",
            "-k",
            f"SOPInstanceUID={generate_uid()}",
            str(jpg),
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def write_dataset(ds: Dataset, path: Path | str) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, 'DICM', file meta) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------- corrupters


def truncate_file(path: Path | str, keep_bytes: int) -> Path:
    """Cut the file at ``path`` to its first ``keep_bytes`` bytes (in place)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    return path


def truncate_pixel_data(ds: Dataset, keep_bytes: int) -> Dataset:
    """Keep only ``keep_bytes`` bytes of an uncompressed Pixel Data (even length kept)."""
    keep_bytes -= keep_bytes % 2
    ds.PixelData = ds.PixelData[:keep_bytes]
    return ds


def drop_pixel_data(ds: Dataset) -> Dataset:
    """Remove Pixel Data (7FE0,0010), keeping the Image Pixel description."""
    del ds.PixelData
    return ds


def lie_about_rows(ds: Dataset, rows: int) -> Dataset:
    """Set Rows to ``rows`` without touching the pixel data."""
    ds.Rows = rows
    return ds
