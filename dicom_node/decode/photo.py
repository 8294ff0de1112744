"""Turn a photo file or a received DICOM dataset into the RGB pixels the model parses.

Two entry points:

* :func:`photo_from_dataset` for a pydicom ``Dataset`` (what the SCP received):
  single-frame VL Photographic Image (PS3.3 A.33.4) and the same pixel forms
  under Dermoscopic Photography, VL Endoscopic, VL Microscopic and Secondary Capture.
* :func:`load_photo` for a file: DICOM Part 10 (or a bare dataset) goes through
  :func:`photo_from_dataset`; anything else is opened with Pillow exactly as the
  official M2FP pipeline does (``Image.open`` -> ``ImageOps.exif_transpose`` ->
  ``convert('RGB')``), so a JPEG gives the model the same pixels either way.

Every failure is a :class:`~dicom_node.decode.errors.PhotoError` subclass with
a reason a PACS administrator can act on; no other exception type escapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    MPEGTransferSyntaxes,
    RLELossless,
)

from dicom_node.decode.errors import CorruptPhotoError, PhotoError, UnsupportedPhotoError
from dicom_node.decode.frame_header import FrameHeaderError, codestream_for, frame_header_problem, read_frame_header
from dicom_node.decode.supported import DECODABLE_SOP_CLASSES, DEFAULT_MAX_PIXELS

# Photometric interpretations (PS3.3 C.7.6.3.1.2) we turn into RGB, with their samples per pixel.
# YBR_ICT / YBR_RCT only occur in JPEG 2000, whose decoders undo the transform themselves.
_COLOUR_PHOTOMETRICS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
_GREY_PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2"}

# Pillow first for JPEG Baseline/Extended: it is the decoder the M2FP pipeline uses for
# JPEG files, so a photo wrapped by img2dcm gives the model exactly the same pixels.
_MARKER_TERMINATED_SYNTAXES = frozenset(
    JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes
)
_PILLOW_JPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit)
_PREFERRED_PLUGIN = {JPEGBaseline8Bit: "pillow", JPEGExtended12Bit: "pillow"}

_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True, eq=False)
class Photo:
    """A decoded photo ready for the model.

    ``rgb`` is a C-contiguous ``(H, W, 3)`` uint8 array; ``dataset`` is the source
    DICOM dataset (``None`` for JPEG/PNG input); ``source`` names where it came
    from (a file path, or a description of the received instance).
    """

    rgb: np.ndarray
    dataset: Dataset | None
    source: str

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not (
            isinstance(rgb, np.ndarray)
            and rgb.dtype == np.uint8
            and rgb.ndim == 3
            and rgb.shape[2] == 3
            and rgb.flags.c_contiguous
        ):
            raise ValueError("Photo.rgb must be a C-contiguous (H, W, 3) uint8 array")

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# --------------------------------------------------------------------------- DICOM


def photo_from_dataset(
    ds: Dataset,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    accepted_sop_classes: set[str] | frozenset[str] | None = None,
    *,
    source: str | None = None,
) -> Photo:
    """Decode a single-frame photo ``Dataset`` to RGB.

    ``accepted_sop_classes`` restricts the SOP classes (default: VL Photographic,
    Dermoscopic Photography, VL Endoscopic, VL Microscopic, Secondary Capture).  ``source`` names the
    input in errors and in the returned :class:`Photo` (default: the dataset's
    file name, else its SOP Instance UID).

    Raises :class:`UnsupportedPhotoError` for valid objects the node does not
    handle and :class:`CorruptPhotoError` for damaged ones; any other failure
    inside decoding is wrapped into :class:`CorruptPhotoError`.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"photo_from_dataset needs a pydicom Dataset, not {type(ds).__name__}")
    if source is None:
        source = _describe_dataset(ds)
    try:
        rgb = _decode_dataset(ds, max_pixels, accepted_sop_classes)
    except PhotoError as err:
        raise err.with_source(source) from err.__cause__
    except MemoryError as exc:
        raise UnsupportedPhotoError("not enough memory to decode the image", source) from exc
    except Exception as exc:  # decoders raise anything: never let it escape raw
        raise CorruptPhotoError(
            f"pixel data could not be decoded: {type(exc).__name__}: {exc}", source
        ) from exc
    return Photo(rgb=rgb, dataset=ds, source=source)


def _describe_dataset(ds: Dataset) -> str:
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, os.PathLike)) and str(filename):
        return str(filename)
    try:
        uid = ds.get("SOPInstanceUID")
    except Exception:
        uid = None
    return f"SOP Instance {uid}" if uid else "DICOM dataset"


def _int_attr(ds: Dataset, keyword: str, tag: str, default: int | None = None) -> int:
    """Return an integer Image Pixel attribute, or raise CorruptPhotoError naming it."""
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise CorruptPhotoError(f"{keyword} {tag} has an unreadable value: {exc}") from exc
    if value is None or value == "":
        if default is not None:
            return default
        raise CorruptPhotoError(f"{keyword} {tag} is missing")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise CorruptPhotoError(f"{keyword} {tag} is not an integer: {value!r}") from exc


def _sop_class(ds: Dataset) -> str:
    sop_class = ds.get("SOPClassUID")
    if not sop_class:
        meta = getattr(ds, "file_meta", None)
        sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    if not sop_class:
        raise CorruptPhotoError("SOP Class UID (0008,0016) is missing")
    return str(sop_class)


def _uid_label(uid: str) -> str:
    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    # A dataset with no file meta (built in memory, or read without it): native pixel
    # data of 8-bit samples reads the same whatever the VR encoding and byte order.
    elem = ds["PixelData"]
    if elem.is_undefined_length or bytes(ds.PixelData[:4]) == _ITEM_TAG_LE:
        raise CorruptPhotoError("Pixel Data is encapsulated (compressed) but no Transfer Syntax UID says how")
    return ExplicitVRLittleEndian


def _decode_dataset(
    ds: Dataset, max_pixels: int, accepted_sop_classes: set[str] | frozenset[str] | None
) -> np.ndarray:
    accepted = DECODABLE_SOP_CLASSES if accepted_sop_classes is None else accepted_sop_classes
    sop_class = _sop_class(ds)
    if sop_class not in accepted:
        names = ", ".join(sorted(UID(u).name for u in accepted)) or "none"
        raise UnsupportedPhotoError(
            f"SOP class {_uid_label(sop_class)} is not handled here (accepted: {names})"
        )

    if "PixelData" not in ds:
        for other in ("FloatPixelData", "DoubleFloatPixelData"):
            if other in ds:
                raise UnsupportedPhotoError(f"{other} is not supported for photos")
        raise CorruptPhotoError("Pixel Data (7FE0,0010) is missing")
    if not ds.PixelData:
        raise CorruptPhotoError("Pixel Data (7FE0,0010) is empty")

    ts = _transfer_syntax(ds)
    if ts in MPEGTransferSyntaxes:
        raise UnsupportedPhotoError(
            f"video transfer syntax {_uid_label(ts)}: only single-frame photos are handled"
        )

    frames = _int_attr(ds, "NumberOfFrames", "(0028,0008)", default=1)
    if frames > 1:
        raise UnsupportedPhotoError(
            f"multi-frame image ({frames} frames): only single-frame photos are handled"
        )
    rows = _int_attr(ds, "Rows", "(0028,0010)")
    columns = _int_attr(ds, "Columns", "(0028,0011)")
    if rows <= 0 or columns <= 0:
        raise CorruptPhotoError(f"image size {columns}x{rows} (Columns x Rows) is empty")
    if rows * columns > max_pixels:
        raise UnsupportedPhotoError(
            f"image too large: {columns}x{rows} = {rows * columns} pixels, limit {max_pixels}"
        )

    samples = _int_attr(ds, "SamplesPerPixel", "(0028,0002)")
    bits_allocated = _int_attr(ds, "BitsAllocated", "(0028,0100)")
    bits_stored = _int_attr(ds, "BitsStored", "(0028,0101)", default=bits_allocated)
    pixel_representation = _int_attr(ds, "PixelRepresentation", "(0028,0103)", default=0)
    if bits_allocated > 8 or bits_stored > 8:
        raise UnsupportedPhotoError(
            f"{bits_stored}-bit samples (BitsAllocated {bits_allocated}): only 8-bit photos are handled"
        )
    if bits_allocated != 8:
        raise UnsupportedPhotoError(f"BitsAllocated {bits_allocated}: only 8-bit photos are handled")
    if not 1 <= bits_stored <= bits_allocated:
        raise CorruptPhotoError(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")
    if pixel_representation != 0:
        raise UnsupportedPhotoError("signed pixel data (PixelRepresentation 1) is not handled")

    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise CorruptPhotoError("Photometric Interpretation (0028,0004) is missing")
    if photometric in _COLOUR_PHOTOMETRICS:
        expected_samples = 3
    elif photometric in _GREY_PHOTOMETRICS:
        expected_samples = 1
    else:
        raise UnsupportedPhotoError(
            f"photometric interpretation {photometric} is not handled "
            "(RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT, MONOCHROME1, MONOCHROME2 are)"
        )
    if samples != expected_samples:
        raise CorruptPhotoError(
            f"SamplesPerPixel {samples} does not match photometric interpretation {photometric}"
        )
    planar = _int_attr(ds, "PlanarConfiguration", "(0028,0006)", default=0) if samples > 1 else 0
    if planar not in (0, 1):
        raise CorruptPhotoError(f"PlanarConfiguration {planar} is neither 0 nor 1")

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedPhotoError(f"transfer syntax {_uid_label(ts)} is not supported") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise UnsupportedPhotoError(f"no decoder installed for transfer syntax {_uid_label(ts)} ({missing})")

    if decoder.is_native:
        _check_native_length(ds, rows, columns, samples, photometric)
    else:
        frame = _check_encapsulated(ds, ts)
        _check_frame_header(frame, ts, rows, columns, samples, max_pixels)
        if ts == RLELossless:
            _check_rle_rows(frame, rows, columns)

    arr, properties = None, {}
    if ts in _PILLOW_JPEG_SYNTAXES and photometric in ("YBR_FULL", "YBR_FULL_422") and bits_stored == 8:
        arr = _decode_ycbcr_jpeg_with_pillow(ds, rows, columns)
        properties = {"photometric_interpretation": "RGB"}
    if arr is None:
        arr, properties = _run_decoder(decoder, ds, ts)

    expected_shape = (rows, columns, 3) if samples == 3 else (rows, columns)
    if arr.shape != expected_shape:
        raise CorruptPhotoError(
            f"decoded image is {arr.shape} but Rows/Columns/SamplesPerPixel say {expected_shape}"
        )

    decoded_photometric = str(properties.get("photometric_interpretation", photometric))
    if decoded_photometric in ("YBR_FULL", "YBR_FULL_422"):
        # pydicom normally converts already (as_rgb); never hand YCbCr to the model
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif decoded_photometric not in ("RGB", "MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedPhotoError(
            f"decoder returned photometric interpretation {decoded_photometric}, not RGB"
        )

    arr = arr.astype(np.uint8, copy=False)
    if bits_stored < 8:
        arr = (arr.astype(np.uint16) * 255 // ((1 << bits_stored) - 1)).astype(np.uint8)
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _check_native_length(ds: Dataset, rows: int, columns: int, samples: int, photometric: str) -> None:
    """Compare the declared geometry with the bytes present before numpy reshapes anything."""
    if photometric == "YBR_FULL_422":
        # native YBR_FULL_422 stores two luma and one Cb/Cr pair per two pixels (PS3.3 C.7.6.3.1.2)
        if columns % 2:
            raise CorruptPhotoError(f"uncompressed YBR_FULL_422 needs an even Columns, not {columns}")
        expected = rows * columns * 2
        layout = f"Rows {rows} x Columns {columns} in YBR_FULL_422"
    else:
        expected = rows * columns * samples
        layout = f"Rows {rows} x Columns {columns} x SamplesPerPixel {samples} x 1 byte"
    present = len(ds.PixelData)
    if present < expected:
        raise CorruptPhotoError(
            f"pixel data truncated: {present} bytes present, {expected} expected ({layout})"
        )
    # one trailing pad byte makes an odd length even (PS3.5 8.1.1); more means the size lies
    if present > expected + (expected % 2):
        raise CorruptPhotoError(
            f"pixel data length does not match the image size: {present} bytes present, "
            f"{expected} expected ({layout}); Rows/Columns are wrong or frames are undeclared"
        )


def _check_encapsulated(ds: Dataset, ts: UID) -> bytes:
    """Catch what some decoders forgive: no encapsulation, no frame, a codestream cut short."""
    if bytes(ds.PixelData[:4]) != _ITEM_TAG_LE:
        raise CorruptPhotoError(
            f"transfer syntax {_uid_label(ts)} is compressed but Pixel Data is not encapsulated"
        )
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise CorruptPhotoError(f"encapsulated Pixel Data is unreadable: {_first_line(exc)}") from exc
    if not frame:
        raise CorruptPhotoError("encapsulated Pixel Data holds no compressed frame")
    if ts in _MARKER_TERMINATED_SYNTAXES:
        # JPEG, JPEG-LS (EOI) and JPEG 2000 (EOC) codestreams end with FFD9, which cannot occur
        # inside their entropy-coded data; libjpeg and CharLS decode a cut stream without error.
        if b"\xff\xd9" not in frame.rstrip(b"\x00")[-16:]:
            raise CorruptPhotoError(
                f"{UID(ts).name} codestream is truncated: {len(frame)} bytes with no end marker"
            )
    return frame


def _check_frame_header(frame: bytes, ts: UID, rows: int, columns: int, samples: int, max_pixels: int) -> None:
    """Hold the codestream's own frame header to the data set and the pixel limit before any decoder
    runs: decoders allocate what the codestream declares, so a few-kilobyte file whose JPEG SOF says
    26000 x 26000 would otherwise cost gigabytes before failing (see :mod:`.frame_header`)."""
    codestream = codestream_for(ts)
    if codestream is None:  # RLE: checked by _check_rle_rows
        return
    try:
        header = read_frame_header(frame, codestream)
    except FrameHeaderError as exc:  # FrameHeaderIncomplete too: this is the whole frame
        raise CorruptPhotoError(str(exc)) from exc
    problem = frame_header_problem(header, rows, columns, samples, max_pixels)
    if problem is not None:
        raise CorruptPhotoError(problem)


def _check_rle_rows(frame: bytes, rows: int, columns: int) -> None:
    """Refuse an RLE frame whose first segment holds whole rows more than Rows x Columns.

    Each 8-bit RLE segment decodes to exactly Rows x Columns bytes (PS3.5 G.3.2). pydicom's
    own RLE plugin only warns about a longer segment and crops it, so a Rows (or Columns) that
    understates the image would silently give the model the top of the photo. A shortfall is
    refused by every decoder already; a few bytes too many (padding some encoders add) are
    tolerated, as pydicom does.
    """
    if len(frame) < 64:
        raise CorruptPhotoError(f"RLE frame is {len(frame)} bytes, shorter than its 64-byte header")
    segments = int.from_bytes(frame[0:4], "little")
    start = int.from_bytes(frame[4:8], "little")
    end = int.from_bytes(frame[8:12], "little") if segments > 1 else len(frame)
    if not 1 <= segments <= 15 or not 64 <= start < end <= len(frame):
        raise CorruptPhotoError(f"RLE header is invalid: {segments} segments, first at bytes {start}-{end}")
    decoded = _packbits_decoded_length(frame[start:end])
    expected = rows * columns
    if decoded >= expected + columns:
        raise CorruptPhotoError(
            f"RLE data holds {decoded} pixels per sample but Rows {rows} x Columns {columns} = "
            f"{expected}: Rows/Columns are wrong"
        )


def _packbits_decoded_length(segment: bytes) -> int:
    """Bytes a PackBits (PS3.5 G.3.1) segment decodes to, without decoding it."""
    length, pos, size = 0, 0, len(segment)
    while pos < size:
        header = segment[pos]
        if header < 128:  # literal run of header + 1 bytes
            length += min(header + 1, size - pos - 1)
            pos += header + 2
        elif header > 128:  # one byte repeated 257 - header times
            if pos + 1 < size:
                length += 257 - header
            pos += 2
        else:  # 128: no operation
            pos += 1
    return length


def _decode_ycbcr_jpeg_with_pillow(ds: Dataset, rows: int, columns: int) -> np.ndarray | None:
    """Decode a YCbCr JPEG frame exactly as Pillow decodes a JPEG file, or None to fall back.

    pydicom's Pillow plugin asks libjpeg for raw YCbCr and converts it with its own float
    matrix, which differs from libjpeg's integer conversion by one grey level here and
    there.  Letting Pillow convert gives the model the very pixels the M2FP pipeline gets
    from the camera's JPEG file.  EXIF orientation is deliberately ignored: in DICOM,
    Rows/Columns define the image and a SEG must match it pixel for pixel.
    """
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(BytesIO(frame), formats=["JPEG"]) as img:
            # An Adobe APP14 transform of 0 means RGB components: trust pydicom's handling then.
            if img.size != (columns, rows) or img.info.get("adobe_transform", 1) == 0:
                return None
            if img.mode not in ("RGB", "YCbCr"):
                return None
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except Exception:
        return None  # pydicom's plugins decide, and report, what is wrong


def _run_decoder(decoder, ds: Dataset, ts: UID) -> tuple[np.ndarray, dict]:
    preferred = _PREFERRED_PLUGIN.get(ts)
    plugins = decoder.available_plugins
    if preferred and preferred in plugins and len(plugins) > 1:
        try:
            return decoder.as_array(ds, index=0, decoding_plugin=preferred)
        except Exception:
            pass  # let pydicom try every installed plugin; report that failure
    try:
        return decoder.as_array(ds, index=0)
    except PhotoError:
        raise
    except Exception as exc:
        raise CorruptPhotoError(
            f"{UID(ts).name} pixel data could not be decoded: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- files


def load_photo(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    accepted_sop_classes: set[str] | frozenset[str] | None = None,
) -> Photo:
    """Load a photo file: DICOM via :func:`photo_from_dataset`, anything else via Pillow.

    DICOM is recognised by the 'DICM' prefix at offset 128, or, for a file that
    Pillow cannot identify, by pydicom reading a dataset with Pixel Data or a
    SOP Class UID from it.
    """
    path = Path(path)
    name = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise CorruptPhotoError(f"cannot read {name}: {exc.strerror or exc}", name) from exc

    if len(head) == 132 and head[128:132] == b"DICM":
        return _load_dicom(path, max_pixels, accepted_sop_classes, force=False)

    try:
        return _load_with_pillow(path, max_pixels)
    except _NotAnImage as not_image:
        try:
            return _load_dicom(path, max_pixels, accepted_sop_classes, force=True)
        except _NotDicom:
            raise CorruptPhotoError(
                f"{name} is neither DICOM nor an image format Pillow can read", name
            ) from not_image.__cause__


class _NotAnImage(Exception):
    pass


class _NotDicom(Exception):
    pass


def _load_with_pillow(path: Path, max_pixels: int) -> Photo:
    name = str(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UnsupportedPhotoError(
                    f"image too large: {width}x{height} = {width * height} pixels, limit {max_pixels}",
                    name,
                )
            # mirrors the M2FP pipeline's loading: do not reorder or add steps
            upright = ImageOps.exif_transpose(img)
            rgb = np.array(upright.convert("RGB"), dtype=np.uint8)
    except PhotoError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise _NotAnImage() from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnsupportedPhotoError(f"image too large: {_first_line(exc)}", name) from exc
    except MemoryError as exc:
        raise UnsupportedPhotoError("not enough memory to decode the image", name) from exc
    except Exception as exc:
        raise CorruptPhotoError(f"cannot decode image {name}: {_first_line(exc)}", name) from exc
    return Photo(rgb=np.ascontiguousarray(rgb, dtype=np.uint8), dataset=None, source=name)


def _load_dicom(
    path: Path,
    max_pixels: int,
    accepted_sop_classes: set[str] | frozenset[str] | None,
    *,
    force: bool,
) -> Photo:
    name = str(path)
    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as exc:
        if force:
            raise _NotDicom() from exc  # a guess that did not work out, whatever the error
        if isinstance(exc, MemoryError):
            raise UnsupportedPhotoError("not enough memory to read the file", name) from exc
        raise CorruptPhotoError(f"cannot read DICOM file {name}: {_first_line(exc)}", name) from exc
    if force and not _looks_like_image_dataset(ds):
        raise _NotDicom()
    return photo_from_dataset(ds, max_pixels, accepted_sop_classes, source=name)


def _looks_like_image_dataset(ds: Dataset) -> bool:
    try:
        return len(ds) > 0 and ("PixelData" in ds or "SOPClassUID" in ds)
    except Exception:
        return False
