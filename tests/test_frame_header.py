"""Codestream frame headers: read from real JPEG, JPEG-LS and JPEG 2000 codestreams, held to the
data set and the pixel limit before any decoder allocates, and a header bomb that costs nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import openjpeg
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.decode.errors import CorruptPhotoError
from dicom_node.decode.frame_header import (
    Codestream,
    FrameHeaderError,
    FrameHeaderIncomplete,
    codestream_for,
    frame_header_problem,
    read_frame_header,
)
from dicom_node.decode.photo import photo_from_dataset
from tests.node_fixtures import REPO, forge_frame_size, header_bomb
from tests.photo_factory import make_grey_photo, make_vl_photo, synthetic_rgb, write_dataset

H, W = 64, 96
RGB = synthetic_rgb(H, W)


def first_frame(ds) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def pillow_jpeg(rgb: np.ndarray, **options) -> bytes:
    out = BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", **options)
    return out.getvalue()


# --------------------------------------------------------------------------- real codestreams


@pytest.mark.parametrize(
    ("ts", "marker"),
    [(JPEGBaseline8Bit, "SOF0"), (JPEGLosslessSV1, "SOF3"), (JPEGLSLossless, "SOF55"),
     (JPEGLSNearLossless, "SOF55"), (JPEG2000Lossless, "SIZ"), (JPEG2000, "SIZ")],
    ids=lambda v: getattr(v, "name", v),
)
def test_frame_headers_of_real_encoders(ts, marker) -> None:
    """dcmtk's dcmcjpeg, CharLS (pyjpegls) and OpenJPEG (pylibjpeg-openjpeg), as the factory encodes."""
    header = read_frame_header(first_frame(make_vl_photo(RGB, ts)), codestream_for(ts))
    assert (header.marker, header.rows, header.columns, header.samples, header.precision) == (marker, H, W, 3, 8)
    assert frame_header_problem(header, H, W, 3, H * W) is None


def test_grey_and_odd_sized_codestreams() -> None:
    grey = read_frame_header(first_frame(make_grey_photo(RGB[:, :, 0], transfer_syntax=JPEG2000Lossless)),
                             Codestream.JPEG_2000)
    assert (grey.rows, grey.columns, grey.samples) == (H, W, 1)
    odd = read_frame_header(pillow_jpeg(synthetic_rgb(37, 53)), Codestream.JPEG)
    assert (odd.rows, odd.columns, odd.samples) == (37, 53, 3)


def test_pillow_jpeg_with_exif_and_progressive() -> None:
    """APP1 (EXIF) segments come before the SOF and are skipped by their length; a progressive
    JPEG declares its frame in SOF2."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x010F] = "camera \xff\xc0 maker"  # bytes that look like a SOF0 marker inside APP1
    with_exif = read_frame_header(pillow_jpeg(RGB, exif=exif.tobytes()), Codestream.JPEG)
    assert (with_exif.marker, with_exif.rows, with_exif.columns) == ("SOF0", H, W)
    progressive = read_frame_header(pillow_jpeg(RGB, progressive=True), Codestream.JPEG)
    assert (progressive.marker, progressive.rows, progressive.columns) == ("SOF2", H, W)


def test_jp2_wrapper_is_looked_through() -> None:
    jp2 = openjpeg.encode(RGB, codec_format=1, photometric_interpretation=1)
    assert jp2[4:8] == b"jP  "
    header = read_frame_header(jp2, Codestream.JPEG_2000)
    assert (header.rows, header.columns, header.samples) == (H, W, 3)


def test_codestream_families_of_transfer_syntaxes() -> None:
    assert codestream_for(JPEGBaseline8Bit) is Codestream.JPEG
    assert codestream_for(JPEGLosslessSV1) is Codestream.JPEG
    assert codestream_for(JPEGLSNearLossless) is Codestream.JPEG_LS
    assert codestream_for(JPEG2000) is Codestream.JPEG_2000
    assert codestream_for(RLELossless) is None
    assert codestream_for("1.2.840.10008.1.2.1") is None


# --------------------------------------------------------------------------- forged and broken headers


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless], ids=lambda v: v.name)
def test_forged_sizes_are_read_as_claimed_and_refused(ts) -> None:
    forged = forge_frame_size(first_frame(make_vl_photo(RGB, ts)), 26000, 26000)
    header = read_frame_header(forged, codestream_for(ts))
    assert (header.rows, header.columns) == (26000, 26000)
    problem = frame_header_problem(header, H, W, 3, 100_000_000)
    assert problem is not None and "26000x26000 = 676000000 pixels, limit 100000000" in problem

    swapped = read_frame_header(forge_frame_size(first_frame(make_vl_photo(RGB, ts)), W, H), codestream_for(ts))
    problem = frame_header_problem(swapped, H, W, 3, 100_000_000)
    assert problem is not None and f"says {H}x{W}" in problem and f"is {W}x{H}" in problem


def test_samples_that_disagree_are_refused() -> None:
    header = read_frame_header(first_frame(make_vl_photo(RGB, JPEG2000Lossless)), Codestream.JPEG_2000)
    assert "with 3 samples" in frame_header_problem(header, H, W, 1, 10**8)


def test_jpeg_without_lines_defers_rows_to_the_data_set() -> None:
    """A SOF with 0 lines (a DNL segment gives them later) is held to Rows for the pixel limit."""
    header = read_frame_header(forge_frame_size(pillow_jpeg(RGB), 0, W), Codestream.JPEG)
    assert header.rows is None
    assert frame_header_problem(header, H, W, 3, H * W) is None
    assert "limit" in frame_header_problem(header, H, W, 3, H * W - 1)


@pytest.mark.parametrize(
    ("data", "codestream", "error", "words"),
    [
        (b"", Codestream.JPEG, FrameHeaderIncomplete, "0 bytes"),
        (b"\x00\x11\x22\x33", Codestream.JPEG, FrameHeaderError, "does not start with SOI"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", Codestream.JPEG, FrameHeaderIncomplete, "ends"),
        (b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 6, Codestream.JPEG, FrameHeaderError, "FFDA"),
        (b"\xff\xd8\xff\xd9", Codestream.JPEG, FrameHeaderError, "FFD9"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x40\x00\x00\x03", Codestream.JPEG, FrameHeaderError, "0 samples"),
        (b"\xff\xd8\xff\xc0\x00\x01", Codestream.JPEG, FrameHeaderError, "length 1"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x40\x00\x60\x03", Codestream.JPEG_LS, FrameHeaderError, "FFC0"),
        (b"\xff\x4f\xff\x52" + b"\x00" * 40, Codestream.JPEG_2000, FrameHeaderError, "no SIZ"),
        (b"\xff\xd8\xff\xf7", Codestream.JPEG_2000, FrameHeaderError, "does not start with SOC"),
    ],
    ids=["empty", "not-jpeg", "cut-before-sof", "sos-first", "eoi-first", "zero-width", "bad-length",
         "sof0-in-jpeg-ls", "j2k-no-siz", "j2k-not-j2k"],
)
def test_broken_codestreams_raise_frame_header_errors(data, codestream, error, words) -> None:
    with pytest.raises(error) as raised:
        read_frame_header(data, codestream)
    assert words in str(raised.value)


def test_j2k_siz_with_inconsistent_components_is_refused() -> None:
    frame = bytearray(first_frame(make_vl_photo(RGB, JPEG2000Lossless)))
    frame[40:42] = (7).to_bytes(2, "big")  # Csiz: 7 components in a segment sized for 3
    with pytest.raises(FrameHeaderError, match="7 components"):
        read_frame_header(bytes(frame), Codestream.JPEG_2000)
    cut = first_frame(make_vl_photo(RGB, JPEG2000Lossless))[:30]
    with pytest.raises(FrameHeaderIncomplete):
        read_frame_header(cut, Codestream.JPEG_2000)


# --------------------------------------------------------------------------- the decoder checks first


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless], ids=lambda v: v.name)
def test_decoder_refuses_a_frame_header_that_disagrees_before_decoding(ts) -> None:
    ds = make_vl_photo(RGB, ts)
    ds.PixelData = encapsulate([forge_frame_size(first_frame(ds), H, W + 8)])
    with pytest.raises(CorruptPhotoError) as raised:
        photo_from_dataset(ds)
    assert f"says {W + 8}x{H} with 3 samples" in raised.value.reason

    ds.PixelData = encapsulate([forge_frame_size(first_frame(make_vl_photo(RGB, ts)), 20000, 20000)])
    with pytest.raises(CorruptPhotoError, match="20000x20000 = 400000000 pixels, limit 100000000"):
        photo_from_dataset(ds)


def test_decoder_refuses_a_codestream_without_a_frame_header() -> None:
    ds = make_vl_photo(RGB, JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0\x00\x04\x00\x00\xff\xd9"])
    with pytest.raises(CorruptPhotoError, match="FFD9 before any frame header"):
        photo_from_dataset(ds)


_MEASURE = """
import json, resource, sys, time
import pydicom
from dicom_node.decode.errors import PhotoError
from dicom_node.decode.photo import photo_from_dataset

photo_from_dataset(pydicom.dcmread(sys.argv[1]))  # decoders imported and warm: only the bombs are measured
out = {}
for path in sys.argv[2:]:
    ds = pydicom.dcmread(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        photo_from_dataset(ds)
        outcome = "decoded"
    except PhotoError as exc:
        outcome = type(exc).__name__ + ": " + exc.reason
    out[path] = {"seconds": time.perf_counter() - started, "outcome": outcome,
                 "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
print(json.dumps(out))
"""


def test_header_bombs_fail_at_once_without_memory(tmp_path: Path) -> None:
    """A few kilobytes whose frame header claims 26000 x 26000 (and 9000 x 9000, under Pillow's own
    bomb limit: unguarded, that one made pydicom's decoders take 770 MB and 1.5 s) fail in under a
    second with the process's peak memory growing by less than 100 MB. Measured in a fresh process:
    this one's peak is already high."""
    warm = write_dataset(make_vl_photo(RGB, JPEGBaseline8Bit), tmp_path / "warm.dcm")
    bombs = {
        "jpeg-26000": header_bomb(26000, 26000),
        "jpeg-9000": header_bomb(9000, 9000),
        "j2k-20000": header_bomb(20000, 20000, JPEG2000Lossless),
        "jpegls-9000": header_bomb(9000, 9000, JPEGLSLossless),
    }
    paths = {name: write_dataset(ds, tmp_path / f"{name}.dcm") for name, ds in bombs.items()}
    assert paths["jpeg-26000"].stat().st_size < 16_000, "the bomb is a small file"
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(warm), *map(str, paths.values())], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    by_name = {name: results[str(path)] for name, path in paths.items()}
    assert {name: r for name, r in by_name.items() if r["seconds"] >= 1.0 or r["peak_growth_mb"] >= 100} == {}
    for name, result in by_name.items():
        assert result["outcome"].startswith("CorruptPhotoError") and "frame header" in result["outcome"], (name, result)
