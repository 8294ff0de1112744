"""Photo decoding: every pixel form to the right RGB, and every refusal as a typed, readable error."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.pixels import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    JPEG2000,
    MPEG4HP41,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.decode.errors import CorruptPhotoError, PhotoError, UnsupportedPhotoError
from dicom_node.decode.photo import Photo, load_photo, photo_from_dataset
from dicom_node.decode.supported import DECODABLE_SOP_CLASSES
from tests.photo_factory import (
    PATCH_COLOURS,
    SECONDARY_CAPTURE,
    VL_ENDOSCOPIC,
    VL_MICROSCOPIC,
    VL_PHOTOGRAPHIC,
    drop_pixel_data,
    inner,
    lie_about_rows,
    make_16bit_photo,
    make_grey_photo,
    make_jpeg_photo_with_img2dcm,
    make_vl_photo,
    patch_boxes,
    synthetic_rgb,
    truncate_file,
    truncate_pixel_data,
    write_dataset,
)

H, W = 96, 144
RGB = synthetic_rgb(H, W)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# Which plugin decodes/encodes what, as installed in the project's environment. These are
# requirements, not optional extras: a missing package fails here instead of skipping tests.
REQUIRED_DECODERS = {
    JPEGBaseline8Bit: {"pillow"},
    JPEGLossless: {"pylibjpeg"},  # pylibjpeg + pylibjpeg-libjpeg
    JPEGLosslessSV1: {"pylibjpeg"},
    JPEGLSLossless: {"pyjpegls"},
    JPEGLSNearLossless: {"pyjpegls"},
    JPEG2000Lossless: {"pillow", "pylibjpeg"},  # pylibjpeg-openjpeg
    JPEG2000: {"pillow", "pylibjpeg"},
    RLELossless: {"pydicom", "pylibjpeg"},  # pylibjpeg-rle
}
REQUIRED_ENCODERS = {
    RLELossless: {"pydicom"},
    JPEGLSLossless: {"pyjpegls"},
    JPEGLSNearLossless: {"pyjpegls"},
    JPEG2000Lossless: {"pylibjpeg"},  # pylibjpeg-openjpeg
    JPEG2000: {"pylibjpeg"},
}


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _assert_patches(rgb: np.ndarray, tolerance: int) -> None:
    """Each flat patch decodes to its pure colour (catches YCbCr/RGB and channel-order mistakes)."""
    boxes = patch_boxes(*rgb.shape[:2])
    for name, colour in PATCH_COLOURS.items():
        region = rgb[inner(boxes[name])].reshape(-1, 3).astype(int)
        worst = np.abs(region - np.array(colour)).max()
        assert worst <= tolerance, f"{name} patch decoded as {region.mean(axis=0)}, expected {colour}"


def _assert_photo(photo: Photo, shape: tuple[int, int] = (H, W)) -> None:
    assert isinstance(photo, Photo)
    assert photo.rgb.dtype == np.uint8
    assert photo.rgb.shape == (*shape, 3)
    assert photo.rgb.flags.c_contiguous


def _raises(exc_type: type[PhotoError], func, *args, **kwargs) -> PhotoError:
    """Call and demand exactly ``exc_type`` (never a raw numpy/pydicom error)."""
    with pytest.raises(PhotoError) as info:
        func(*args, **kwargs)
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__} raised, {exc_type.__name__} expected: {err}"
    assert err.reason and "Traceback" not in err.reason and "\n" not in err.reason
    return err


# --------------------------------------------------------------------- environment


@pytest.mark.parametrize("ts", sorted(REQUIRED_DECODERS), ids=lambda u: UID(u).name)
def test_required_decoder_plugins_are_installed(ts):
    available = set(get_decoder(ts).available_plugins)
    missing = REQUIRED_DECODERS[ts] - available
    assert not missing, f"{UID(ts).name}: decoder plugins {missing} not installed"


@pytest.mark.parametrize("ts", sorted(REQUIRED_ENCODERS), ids=lambda u: UID(u).name)
def test_required_encoder_plugins_are_installed(ts):
    available = set(get_encoder(ts).available_plugins)
    missing = REQUIRED_ENCODERS[ts] - available
    assert not missing, f"{UID(ts).name}: encoder plugins {missing} not installed"


@pytest.mark.parametrize("tool", ["img2dcm", "dcmcjpeg", "dciodvfy"])
def test_dicom_tools_are_installed(tool):
    assert shutil.which(tool), f"{tool} missing: apt-get install dcmtk dicom3tools"


# --------------------------------------------------------------------- factory


def test_synthetic_rgb_is_deterministic_and_has_pure_patches():
    assert np.array_equal(synthetic_rgb(H, W), synthetic_rgb(H, W))
    _assert_patches(RGB, tolerance=0)


def test_factory_photo_has_identity_and_fresh_uids():
    a, b = make_vl_photo(RGB), make_vl_photo(RGB)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert a.get(keyword) and a.get(keyword) != b.get(keyword)
    assert a.SOPClassUID == VL_PHOTOGRAPHIC
    assert a.Modality == "XC"
    assert a.BodyPartExamined == "WHOLEBODY"
    assert a.PatientName and a.PatientID


@pytest.mark.parametrize(
    "ds_factory",
    [
        pytest.param(lambda: make_vl_photo(RGB), id="uncompressed"),
        pytest.param(lambda: make_vl_photo(RGB, transfer_syntax=JPEGBaseline8Bit), id="jpeg-baseline"),
        pytest.param(lambda: make_vl_photo(RGB, transfer_syntax=RLELossless), id="rle"),
        pytest.param(lambda: make_grey_photo(RGB[..., 0]), id="monochrome2"),
        pytest.param(lambda: make_vl_photo(RGB, sop_class=SECONDARY_CAPTURE), id="secondary-capture"),
    ],
)
def test_factory_output_passes_dciodvfy(ds_factory, tmp_path):
    path = write_dataset(ds_factory(), tmp_path / "photo.dcm")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_img2dcm_photo_is_jpeg_baseline_vl_photographic(tmp_path):
    ds = pydicom.dcmread(make_jpeg_photo_with_img2dcm(RGB, tmp_path))
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.SOPClassUID == VL_PHOTOGRAPHIC
    assert ds.PhotometricInterpretation == "YBR_FULL_422"


# --------------------------------------------------------------------- lossless forms

LOSSLESS_FORMS = {
    "explicit-planar0": dict(),
    "explicit-planar1": dict(planar_configuration=1),
    "implicit": dict(transfer_syntax=ImplicitVRLittleEndian),
    "rle": dict(transfer_syntax=RLELossless),
    "rle-planar1-label": dict(transfer_syntax=RLELossless, planar_configuration=1),
    "jpegls-lossless": dict(transfer_syntax=JPEGLSLossless),
    "j2k-lossless-rgb": dict(transfer_syntax=JPEG2000Lossless),
    "j2k-lossless-ybr-rct": dict(transfer_syntax=JPEG2000Lossless, photometric="YBR_RCT"),
    "jpeg-lossless-sv1": dict(transfer_syntax=JPEGLosslessSV1),
    "jpeg-lossless-p14": dict(transfer_syntax=JPEGLossless),
}


@pytest.mark.parametrize("form", sorted(LOSSLESS_FORMS))
def test_lossless_form_decodes_exactly(form, tmp_path):
    ds = make_vl_photo(RGB, **LOSSLESS_FORMS[form])
    photo = photo_from_dataset(ds)
    _assert_photo(photo)
    assert np.array_equal(photo.rgb, RGB)
    assert photo.dataset is ds

    path = write_dataset(ds, tmp_path / f"{form}.dcm")
    from_file = load_photo(path)
    assert np.array_equal(from_file.rgb, RGB)
    assert from_file.source == str(path)
    assert from_file.dataset.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize(
    "ts", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["deflated", "big-endian"]
)
def test_other_native_transfer_syntaxes_decode_exactly(ts, tmp_path):
    ds = make_vl_photo(RGB)
    ds.file_meta.TransferSyntaxUID = ts
    path = write_dataset(ds, tmp_path / "photo.dcm")
    assert np.array_equal(load_photo(path).rgb, RGB)


def test_planar_configurations_agree():
    planar0 = photo_from_dataset(make_vl_photo(RGB, planar_configuration=0)).rgb
    planar1 = photo_from_dataset(make_vl_photo(RGB, planar_configuration=1)).rgb
    assert np.array_equal(planar0, planar1)


def test_odd_sized_image_decodes_exactly():
    rgb = synthetic_rgb(67, 101)
    for kwargs in (dict(), dict(planar_configuration=1), dict(transfer_syntax=RLELossless)):
        assert np.array_equal(photo_from_dataset(make_vl_photo(rgb, **kwargs)).rgb, rgb)


def test_dataset_without_file_meta_decodes():
    ds = make_vl_photo(RGB)
    del ds.file_meta
    assert np.array_equal(photo_from_dataset(ds).rgb, RGB)


# --------------------------------------------------------------------- lossy / YCbCr forms

# form -> (builder kwargs, max mean abs error, max patch deviation)
COLOUR_FORMS = {
    "ybr-full-native": (dict(photometric="YBR_FULL"), 0.5, 2),
    "ybr-full-422-native": (dict(photometric="YBR_FULL_422"), 1.5, 2),
    "jpegls-near-lossless": (dict(transfer_syntax=JPEGLSNearLossless), 0.5, 2),
    "j2k-lossy-rgb": (dict(transfer_syntax=JPEG2000), 3.0, 12),
    "j2k-lossy-ybr-ict": (dict(transfer_syntax=JPEG2000, photometric="YBR_ICT"), 3.0, 12),
    "jpeg-baseline-ybr-full-422": (dict(transfer_syntax=JPEGBaseline8Bit), 3.0, 12),
    "jpeg-baseline-rgb-components": (dict(transfer_syntax=JPEGBaseline8Bit, jpeg_ycbcr=False), 3.0, 12),
}


@pytest.mark.parametrize("form", sorted(COLOUR_FORMS))
def test_colour_form_decodes_to_rgb(form):
    kwargs, max_mae, patch_tolerance = COLOUR_FORMS[form]
    ds = make_vl_photo(RGB, **kwargs)
    photo = photo_from_dataset(ds)
    _assert_photo(photo)
    assert _mae(photo.rgb, RGB) <= max_mae
    _assert_patches(photo.rgb, patch_tolerance)


def test_img2dcm_jpeg_decodes_to_rgb(tmp_path):
    path = make_jpeg_photo_with_img2dcm(RGB, tmp_path)
    photo = load_photo(path)
    _assert_photo(photo)
    assert _mae(photo.rgb, RGB) <= 3.0
    _assert_patches(photo.rgb, 12)
    # the same pixels the M2FP pipeline gets from the JPEG file itself (Pillow decodes both)
    assert np.array_equal(photo.rgb, load_photo(path.with_suffix(".jpg")).rgb)
    # and the same from the received dataset as from the file
    assert np.array_equal(photo_from_dataset(pydicom.dcmread(path)).rgb, photo.rgb)


def test_img2dcm_jpeg_of_a_real_size_photo(tmp_path):
    rgb = synthetic_rgb(480, 640)
    photo = load_photo(make_jpeg_photo_with_img2dcm(rgb, tmp_path))
    _assert_photo(photo, (480, 640))
    _assert_patches(photo.rgb, 12)


# --------------------------------------------------------------------- SOP classes


@pytest.mark.parametrize(
    "sop_class",
    [VL_PHOTOGRAPHIC, VL_ENDOSCOPIC, VL_MICROSCOPIC, SECONDARY_CAPTURE],
    ids=["photographic", "endoscopic", "microscopic", "secondary-capture"],
)
def test_default_accepts_the_four_photo_sop_classes(sop_class):
    assert sop_class in DECODABLE_SOP_CLASSES
    photo = photo_from_dataset(make_vl_photo(RGB, sop_class=sop_class))
    assert np.array_equal(photo.rgb, RGB)


def test_restricted_sop_classes_refuse_the_others():
    ds = make_vl_photo(RGB, sop_class=SECONDARY_CAPTURE)
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds, accepted_sop_classes={VL_PHOTOGRAPHIC})
    assert "SOP class" in err.reason and SECONDARY_CAPTURE in err.reason
    assert photo_from_dataset(make_vl_photo(RGB), accepted_sop_classes={VL_PHOTOGRAPHIC})


def test_wrong_sop_class_is_unsupported():
    ds = make_vl_photo(RGB, SOPClassUID=CT_IMAGE_STORAGE)
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds)
    assert "CT Image Storage" in err.reason


# --------------------------------------------------------------------- grey photos


def test_monochrome2_becomes_three_equal_channels():
    grey = RGB[..., 1]
    photo = photo_from_dataset(make_grey_photo(grey, "MONOCHROME2"))
    _assert_photo(photo)
    for channel in range(3):
        assert np.array_equal(photo.rgb[..., channel], grey)


def test_monochrome1_is_inverted():
    grey = RGB[..., 0]
    ds = make_grey_photo(grey, "MONOCHROME1", sop_class=SECONDARY_CAPTURE)
    assert np.array_equal(np.frombuffer(ds.PixelData, np.uint8).reshape(H, W), 255 - grey)
    photo = photo_from_dataset(ds)
    assert np.array_equal(photo.rgb, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1], ids=lambda u: UID(u).name
)
def test_compressed_monochrome_decodes_exactly(ts):
    grey = RGB[..., 2]
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        photo = photo_from_dataset(make_grey_photo(grey, photometric, transfer_syntax=ts))
        assert np.array_equal(photo.rgb, np.repeat(grey[..., None], 3, axis=2)), photometric


def test_jpeg_baseline_monochrome_decodes():
    grey = RGB[..., 1]
    photo = photo_from_dataset(make_grey_photo(grey, transfer_syntax=JPEGBaseline8Bit))
    assert np.array_equal(photo.rgb[..., 0], photo.rgb[..., 2])
    assert _mae(photo.rgb[..., 0], grey) <= 2.0


def test_fewer_than_8_bits_stored_are_scaled_to_full_range():
    grey = (np.arange(H * W, dtype=np.uint32) % 64).astype(np.uint8).reshape(H, W)
    ds = make_grey_photo(grey, BitsStored=6, HighBit=5)
    photo = photo_from_dataset(ds)
    assert photo.rgb[..., 0].max() == 255
    assert np.array_equal(photo.rgb[..., 0], (grey.astype(np.uint16) * 255 // 63).astype(np.uint8))


# --------------------------------------------------------------------- refused (unsupported)


def test_multi_frame_is_unsupported():
    ds = make_vl_photo(RGB)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds)
    assert "multi-frame" in err.reason and "2 frames" in err.reason


@pytest.mark.parametrize(
    "image", [RGB[..., 0].astype(np.uint16) * 200, RGB.astype(np.uint16) * 200], ids=["grey", "rgb"]
)
def test_16_bit_is_unsupported(image):
    err = _raises(UnsupportedPhotoError, photo_from_dataset, make_16bit_photo(image))
    assert "16-bit" in err.reason and "8-bit" in err.reason


def test_12_bit_stored_is_unsupported():
    err = _raises(UnsupportedPhotoError, photo_from_dataset, make_16bit_photo(RGB[..., 0], bits_stored=12))
    assert "12-bit" in err.reason


def test_palette_colour_is_unsupported():
    ds = make_grey_photo(RGB[..., 0], PhotometricInterpretation="PALETTE COLOR")
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds)
    assert "PALETTE COLOR" in err.reason


def test_signed_pixels_are_unsupported():
    ds = make_grey_photo(RGB[..., 0], PixelRepresentation=1)
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds)
    assert "signed" in err.reason


def test_too_many_pixels_is_unsupported():
    err = _raises(UnsupportedPhotoError, photo_from_dataset, make_vl_photo(RGB), max_pixels=H * W - 1)
    assert "image too large" in err.reason and str(H * W) in err.reason
    assert photo_from_dataset(make_vl_photo(RGB), max_pixels=H * W)


def test_video_transfer_syntax_is_unsupported():
    ds = make_vl_photo(RGB)
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds)
    assert "video" in err.reason


def test_unknown_transfer_syntax_is_unsupported():
    ds = make_vl_photo(RGB)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    err = _raises(UnsupportedPhotoError, photo_from_dataset, ds)
    assert "1.2.3.4.5.6.7" in err.reason


def test_transfer_syntax_without_installed_decoder_is_unsupported(monkeypatch):
    class NoPlugins:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-libjpeg"]

    monkeypatch.setattr("dicom_node.decode.photo.get_decoder", lambda uid: NoPlugins())
    err = _raises(UnsupportedPhotoError, photo_from_dataset, make_vl_photo(RGB))
    assert "no decoder installed" in err.reason and "pylibjpeg-libjpeg" in err.reason


# --------------------------------------------------------------------- corrupt


def test_truncated_pixel_data_is_corrupt():
    ds = truncate_pixel_data(make_vl_photo(RGB), 10_000)
    err = _raises(CorruptPhotoError, photo_from_dataset, ds)
    assert err.reason.startswith("pixel data truncated: 10000 bytes present, 41472 expected")


def test_truncated_file_is_corrupt(tmp_path):
    path = write_dataset(make_vl_photo(RGB), tmp_path / "photo.dcm")
    truncate_file(path, path.stat().st_size - 5000)
    err = _raises(CorruptPhotoError, load_photo, path)
    assert "truncated" in err.reason
    assert str(path) in str(err)


def test_file_truncated_in_the_header_is_corrupt(tmp_path):
    path = write_dataset(make_vl_photo(RGB), tmp_path / "photo.dcm")
    truncate_file(path, 300)
    err = _raises(CorruptPhotoError, load_photo, path)
    assert str(path) in str(err)


def test_missing_pixel_data_is_corrupt():
    err = _raises(CorruptPhotoError, photo_from_dataset, drop_pixel_data(make_vl_photo(RGB)))
    assert "Pixel Data" in err.reason and "missing" in err.reason


@pytest.mark.parametrize("rows", [H // 2, H + 1, H * 2])
def test_rows_that_lie_are_corrupt(rows):
    err = _raises(CorruptPhotoError, photo_from_dataset, lie_about_rows(make_vl_photo(RGB), rows))
    assert "41472 bytes present" in err.reason


def test_columns_that_lie_are_corrupt():
    ds = make_vl_photo(RGB, Columns=W - 1)
    _raises(CorruptPhotoError, photo_from_dataset, ds)


def test_samples_per_pixel_that_lie_are_corrupt():
    err = _raises(CorruptPhotoError, photo_from_dataset, make_vl_photo(RGB, SamplesPerPixel=1))
    assert "SamplesPerPixel" in err.reason


@pytest.mark.parametrize(
    "keyword", ["Rows", "Columns", "BitsAllocated", "PhotometricInterpretation", "SOPClassUID"]
)
def test_missing_image_pixel_attribute_is_corrupt(keyword):
    ds = make_vl_photo(RGB, **{keyword: None})
    if keyword == "SOPClassUID":
        del ds.file_meta.MediaStorageSOPClassUID
    err = _raises(CorruptPhotoError, photo_from_dataset, ds)
    assert "missing" in err.reason


def test_compressed_transfer_syntax_with_native_data_is_corrupt():
    ds = make_vl_photo(RGB)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    err = _raises(CorruptPhotoError, photo_from_dataset, ds)
    assert "not encapsulated" in err.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(transfer_syntax=JPEGBaseline8Bit),
        dict(transfer_syntax=JPEG2000Lossless),
        dict(transfer_syntax=JPEGLSLossless),
        dict(transfer_syntax=RLELossless),
        dict(transfer_syntax=JPEGLosslessSV1),
    ],
    ids=["jpeg-baseline", "j2k", "jpegls", "rle", "jpeg-lossless"],
)
def test_damaged_codestream_is_corrupt(kwargs):
    from pydicom.encaps import encapsulate, generate_frames

    ds = make_vl_photo(RGB, **kwargs)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])  # cut the codestream short
    _raises(CorruptPhotoError, photo_from_dataset, ds)
    ds.PixelData = encapsulate([b"\x00\x11\x22\x33" * 64])  # no codestream at all
    _raises(CorruptPhotoError, photo_from_dataset, ds)
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00\x11\x22\x33" * 64 + b"\xff\xd9"])  # garbage inside
    _raises(CorruptPhotoError, photo_from_dataset, ds)


def test_compressed_rows_that_lie_are_corrupt():
    ds = make_vl_photo(RGB, transfer_syntax=JPEG2000Lossless, Rows=H // 2)
    _raises(CorruptPhotoError, photo_from_dataset, ds)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_only_ever_raise_photo_errors(tmp_path):
    """Seeded truncations and byte flips: success or a PhotoError, never anything else."""
    rng = np.random.default_rng(7)
    sources = {
        "native.dcm": write_dataset(make_vl_photo(RGB), tmp_path / "native.dcm").read_bytes(),
        "jpeg.dcm": make_jpeg_photo_with_img2dcm(RGB, tmp_path / "src").read_bytes(),
        "rle.dcm": write_dataset(
            make_vl_photo(RGB, transfer_syntax=RLELossless), tmp_path / "rle.dcm"
        ).read_bytes(),
    }
    for name, data in sources.items():
        for trial in range(25):
            mutated = bytearray(data)
            if trial % 2:
                mutated = mutated[: int(rng.integers(0, len(mutated)))]
            else:
                for pos in rng.integers(128, len(mutated), size=8):
                    mutated[pos] = int(rng.integers(0, 256))
            path = tmp_path / f"{trial}-{name}"
            path.write_bytes(bytes(mutated))
            try:
                photo = load_photo(path)
            except PhotoError:
                continue
            _assert_photo(photo)


# --------------------------------------------------------------------- files via Pillow


def test_png_loads_exactly(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(RGB).save(path)
    photo = load_photo(path)
    _assert_photo(photo)
    assert np.array_equal(photo.rgb, RGB)
    assert photo.dataset is None and photo.source == str(path)


def test_jpeg_loads_like_pillow(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(RGB).save(path, quality=95)
    photo = load_photo(path)
    _assert_photo(photo)
    with Image.open(path) as img:
        assert np.array_equal(photo.rgb, np.asarray(ImageOps.exif_transpose(img).convert("RGB")))
    _assert_patches(photo.rgb, 12)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_other_png_modes_become_rgb(mode, tmp_path):
    path = tmp_path / f"photo-{mode.replace(';', '')}.png"
    Image.fromarray(RGB).convert(mode).save(path)
    _assert_photo(load_photo(path))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_rotated_photo_is_transposed(suffix, tmp_path):
    path = tmp_path / f"rotated{suffix}"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    Image.fromarray(RGB).save(path, exif=exif)
    photo = load_photo(path)
    _assert_photo(photo, (W, H))
    expected = np.rot90(RGB, k=-1)
    if suffix == ".png":
        assert np.array_equal(photo.rgb, expected)
    else:
        _assert_patches(np.ascontiguousarray(np.rot90(photo.rgb, k=1)), 12)


def test_pillow_image_over_max_pixels_is_unsupported(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(RGB).save(path)
    err = _raises(UnsupportedPhotoError, load_photo, path, max_pixels=1000)
    assert "image too large" in err.reason


def test_pillow_decompression_bomb_is_unsupported(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(RGB).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", (H * W) // 3)
    err = _raises(UnsupportedPhotoError, load_photo, path)
    assert "image too large" in err.reason


def test_pillow_decompression_bomb_warning_as_error_is_unsupported(tmp_path, monkeypatch):
    path = tmp_path / "almost-bomb.png"
    Image.fromarray(RGB).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W - 1)  # over the limit, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        err = _raises(UnsupportedPhotoError, load_photo, path)
    assert "image too large" in err.reason


def test_truncated_jpeg_is_corrupt_and_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(synthetic_rgb(480, 640)).save(path, quality=95)
    truncate_file(path, path.stat().st_size // 2)
    err = _raises(CorruptPhotoError, load_photo, path)
    assert str(path) in err.reason


@pytest.mark.parametrize(
    "content", [b"", b"hello, not a photo\n" * 20, bytes(range(256)) * 4], ids=["empty", "text", "binary"]
)
def test_unreadable_file_is_corrupt_and_names_the_file(content, tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    err = _raises(CorruptPhotoError, load_photo, path)
    assert str(path) in err.reason


def test_missing_file_is_corrupt_and_names_the_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    err = _raises(CorruptPhotoError, load_photo, path)
    assert str(path) in err.reason


def test_dicom_file_without_preamble_is_recognised(tmp_path):
    ds = make_vl_photo(RGB)
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)  # no preamble, no file meta
    assert path.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(load_photo(path).rgb, RGB)


def test_dicom_file_of_wrong_sop_class_is_unsupported(tmp_path):
    path = write_dataset(make_vl_photo(RGB, SOPClassUID=CT_IMAGE_STORAGE), tmp_path / "ct.dcm")
    err = _raises(UnsupportedPhotoError, load_photo, path)
    assert str(path) in str(err)


def test_error_message_names_the_source():
    ds = drop_pixel_data(make_vl_photo(RGB))
    with pytest.raises(CorruptPhotoError) as info:
        photo_from_dataset(ds)
    assert ds.SOPInstanceUID in str(info.value)
    with pytest.raises(CorruptPhotoError) as info:
        photo_from_dataset(ds, source="from ORTHANC")
    assert str(info.value).startswith("from ORTHANC: ")


def test_photo_rejects_non_rgb_arrays():
    with pytest.raises(ValueError):
        Photo(rgb=np.zeros((4, 4), np.uint8), dataset=None, source="x")
    with pytest.raises(ValueError):
        Photo(rgb=np.zeros((4, 4, 3), np.float32), dataset=None, source="x")
