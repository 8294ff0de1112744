"""Rendering: palette lookup, the overlay blend and legend, and lossless PNG output."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dicom_node.parse.classes import CLASS_COLORS, CLASS_NAMES
from dicom_node.parse.render import color_label_map, overlay, save_png, to_png_bytes

H, W = 480, 640


def _photo(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label_map_bottom_right(h: int = H, w: int = W) -> np.ndarray:
    """Parts only in the bottom-right quarter, so a legend in any other corner cannot touch them."""
    label_map = np.zeros((h, w), dtype=np.uint8)
    label_map[3 * h // 4:h - 10, 3 * w // 4:w - 10] = 5  # UpperClothes
    label_map[3 * h // 4 + 20:3 * h // 4 + 60, 3 * w // 4 + 20:3 * w // 4 + 60] = 13  # Face
    return label_map


def _expected_blend(photo: np.ndarray, label_map: np.ndarray, alpha: float) -> np.ndarray:
    colors = np.asarray(CLASS_COLORS, dtype=np.float64)[label_map]
    return (1.0 - alpha) * photo.astype(np.float64) + alpha * colors


def _outside_top_left_quarter(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy >= h // 2) | (xx >= w // 2)


# --- color_label_map ---------------------------------------------------------------------------


def test_color_label_map_uses_the_class_colour_of_every_class():
    label_map = np.arange(len(CLASS_COLORS), dtype=np.uint8).reshape(1, -1).repeat(3, axis=0)
    rgb = color_label_map(label_map)
    assert rgb.shape == (3, len(CLASS_COLORS), 3)
    assert rgb.dtype == np.uint8
    for class_index, color in enumerate(CLASS_COLORS):
        assert tuple(int(v) for v in rgb[1, class_index]) == color, CLASS_NAMES[class_index]


def test_color_label_map_rejects_a_class_beyond_the_list_and_names_it():
    label_map = np.zeros((4, 4), dtype=np.uint8)
    label_map[2, 3] = 37
    with pytest.raises(ValueError, match="37"):
        color_label_map(label_map)
    label_map[2, 3] = len(CLASS_COLORS)
    with pytest.raises(ValueError, match=str(len(CLASS_COLORS))):
        color_label_map(label_map)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4), np.float32), np.full((4, 4), -1, np.int16)],
    ids=["3-D", "float", "negative"],
)
def test_color_label_map_rejects_malformed_label_maps(bad):
    with pytest.raises(ValueError):
        color_label_map(bad)


# --- overlay -----------------------------------------------------------------------------------


def test_overlay_keeps_background_pixels_exactly_and_keeps_the_photo_size():
    photo = _photo()
    label_map = _label_map_bottom_right()
    photo_before = photo.copy()
    out = overlay(photo, label_map, alpha=0.6)
    assert out.shape == photo.shape and out.dtype == np.uint8
    check = (label_map == 0) & _outside_top_left_quarter()
    assert check.sum() > H * W // 3  # the check covers a real part of the image
    np.testing.assert_array_equal(out[check], photo[check])
    np.testing.assert_array_equal(photo, photo_before)  # the caller's photo is not drawn on


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8, 1.0])
def test_overlay_blends_labelled_pixels_within_one_grey_level(alpha):
    photo = _photo(seed=1)
    label_map = _label_map_bottom_right()
    out = overlay(photo, label_map, alpha=alpha)
    labelled = label_map != 0
    expected = _expected_blend(photo, label_map, alpha)
    difference = np.abs(out[labelled].astype(np.float64) - expected[labelled])
    assert difference.max() <= 1.0
    # the tint is really there: a 25 % blend of random pixels with fixed colours moves most of them
    assert np.mean(np.any(out[labelled] != photo[labelled], axis=1)) > 0.5


def test_overlay_with_alpha_zero_and_no_legend_is_the_photo():
    photo = _photo(seed=2)
    out = overlay(photo, _label_map_bottom_right(), alpha=0.0, legend=False)
    np.testing.assert_array_equal(out, photo)


def test_legend_is_drawn_when_classes_are_present_and_only_then():
    photo = np.full((H, W, 3), 128, dtype=np.uint8)
    label_map = _label_map_bottom_right()
    corner = (slice(0, 60), slice(0, 60))  # the legend's preferred corner when all four are empty
    with_legend = overlay(photo, label_map, alpha=0.5, legend=True)
    without_legend = overlay(photo, label_map, alpha=0.5, legend=False)
    assert np.any(with_legend[corner] != photo[corner])
    np.testing.assert_array_equal(without_legend[corner], photo[corner])
    # the legend box is dark behind light text: it mostly darkens the mid-grey photo
    assert with_legend[corner].mean() < 100

    nothing_labelled = np.zeros((H, W), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(photo, nothing_labelled, legend=True), photo)


def test_legend_avoids_the_corner_occupied_by_the_body():
    photo = _photo(seed=3)
    label_map = np.zeros((H, W), dtype=np.uint8)
    label_map[:, : W // 2] = 2  # parts cover the whole left half, both left corners included
    label_map[H // 3:, W // 4: W // 2] = 9
    out = overlay(photo, label_map, alpha=0.5)
    left = label_map != 0
    expected = _expected_blend(photo, label_map, 0.5)
    assert np.abs(out[left].astype(np.float64) - expected[left]).max() <= 1.0
    assert np.any(out[:, W // 2:] != photo[:, W // 2:])  # so it went to the right half


def _legend_height(photo: np.ndarray, label_map: np.ndarray) -> int:
    top_half = slice(0, photo.shape[0] // 2)
    changed = overlay(photo, label_map)[top_half] != photo[top_half]
    changed_rows = np.flatnonzero(np.any(changed, axis=(1, 2)))
    assert changed_rows.size, "no legend found in the top half"
    return int(changed_rows[-1] - changed_rows[0] + 1)


def test_legend_scales_with_image_size_on_a_4000x3000_photo():
    small_photo = np.full((H, W, 3), 90, dtype=np.uint8)
    big_photo = np.full((3000, 4000, 3), 90, dtype=np.uint8)
    small_height = _legend_height(small_photo, _label_map_bottom_right())
    big_height = _legend_height(big_photo, _label_map_bottom_right(3000, 4000))
    # two legend rows must be tall enough to read on a 480-pixel-high photo...
    assert small_height >= 30
    # ...and grow with the shorter side (6.25x here) so the legend stays readable on a 12 MP photo
    assert big_height >= 3.5 * small_height


def test_overlay_runs_on_a_4000x3000_photo():
    photo = _photo(3000, 4000, seed=4)
    label_map = _label_map_bottom_right(3000, 4000)
    out = overlay(photo, label_map)
    assert out.shape == photo.shape
    background = (label_map == 0) & _outside_top_left_quarter(3000, 4000)
    np.testing.assert_array_equal(out[background], photo[background])


@pytest.mark.parametrize(
    ("photo", "label_map", "alpha", "message"),
    [
        (np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8), 0.5, "photo"),
        (np.zeros((H, W, 4), np.uint8), np.zeros((H, W), np.uint8), 0.5, "photo"),
        (np.zeros((H, W, 3), np.float32), np.zeros((H, W), np.uint8), 0.5, "uint8"),
        (np.zeros((H, W, 3), np.uint8), np.zeros((H, W + 1), np.uint8), 0.5, "width x height"),
        (np.zeros((H, W, 3), np.uint8), np.zeros((H, W, 1), np.uint8), 0.5, "label map"),
        (np.zeros((H, W, 3), np.uint8), np.full((H, W), 30, np.uint8), 0.5, "30"),
        (np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8), -0.1, "alpha"),
        (np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8), 1.5, "alpha"),
        (np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8), float("nan"), "alpha"),
    ],
    ids=["2-D photo", "RGBA photo", "float photo", "size mismatch", "3-D label map", "bad class",
         "alpha below 0", "alpha above 1", "alpha NaN"],
)
def test_overlay_rejects_invalid_inputs(photo, label_map, alpha, message):
    with pytest.raises(ValueError, match=message):
        overlay(photo, label_map, alpha=alpha)


def test_overlay_rejects_too_few_class_names_for_the_legend():
    with pytest.raises(ValueError, match="class names"):
        overlay(_photo(), _label_map_bottom_right(), class_names=("Background", "Hat"))


# --- PNG ---------------------------------------------------------------------------------------


def test_label_map_png_round_trip_is_exact_and_single_channel():
    label_map = np.random.default_rng(5).integers(0, len(CLASS_NAMES), (H, W), dtype=np.uint8)
    with Image.open(io.BytesIO(to_png_bytes(label_map))) as image:
        assert image.format == "PNG"
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), label_map)


def test_save_png_writes_rgb_and_grey_files(tmp_path):
    rgb = _photo(seed=6)
    label_map = _label_map_bottom_right()
    save_png(rgb, tmp_path / "photo_overlay.png")
    save_png(label_map, tmp_path / "photo_labels.png")
    with Image.open(tmp_path / "photo_overlay.png") as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgb)
    with Image.open(tmp_path / "photo_labels.png") as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), label_map)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), np.uint16),
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros(4, np.uint8),
    ],
    ids=["uint16", "float", "RGBA", "1-D"],
)
def test_png_rejects_images_it_cannot_write_losslessly(bad, tmp_path):
    with pytest.raises(ValueError):
        to_png_bytes(bad)
    with pytest.raises(ValueError):
        save_png(bad, tmp_path / "bad.png")
