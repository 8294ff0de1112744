"""class_counts against numpy's bincount, the definition it must agree with."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.parse.counting import class_counts, classes_present


def _reference(label_map: np.ndarray, n: int, where: np.ndarray | None = None) -> np.ndarray:
    values = label_map if where is None else label_map[where]
    return np.bincount(values.ravel().astype(np.int64), minlength=n)[:n]


@pytest.mark.parametrize("n", [20, 128, 200])
def test_counts_match_bincount_with_and_without_mask(n: int) -> None:
    rng = np.random.default_rng(n)
    label_map = rng.integers(0, n, (301, 257)).astype(np.uint8)
    mask = rng.random(label_map.shape) < 0.3
    assert np.array_equal(class_counts(label_map, n), _reference(label_map, n))
    assert np.array_equal(class_counts(label_map, n, mask), _reference(label_map, n, mask))
    assert class_counts(label_map, n, np.zeros_like(mask)).sum() == 0
    assert class_counts(label_map, n, np.ones_like(mask)).sum() == label_map.size


def test_views_read_only_and_wider_dtypes() -> None:
    rng = np.random.default_rng(1)
    label_map = rng.integers(0, 20, (64, 96)).astype(np.uint8)
    mask = rng.random(label_map.shape) < 0.5
    view, mask_view = label_map[::2, 5:], mask[::2, 5:]  # not contiguous
    assert np.array_equal(class_counts(view, 20, mask_view), _reference(view, 20, mask_view))
    frozen = label_map.copy()
    frozen.flags.writeable = False
    assert np.array_equal(class_counts(frozen, 20), _reference(label_map, 20))
    wide = label_map.astype(np.int64)
    assert np.array_equal(class_counts(wide, 20, mask), _reference(label_map, 20, mask))


def test_labels_outside_the_classes_are_an_error() -> None:
    label_map = np.zeros((8, 8), np.uint8)
    label_map[3, 3] = 25
    with pytest.raises(ValueError, match="outside 0..19"):
        class_counts(label_map, 20)
    with pytest.raises(ValueError, match="outside 0..19"):
        class_counts(label_map, 20, label_map == 0)  # would alias into the masked half otherwise
    with pytest.raises(ValueError, match="outside 0..19"):
        class_counts(np.full((2, 2), -1, np.int32), 20)
    with pytest.raises(ValueError, match="mask shape"):
        class_counts(label_map, 26, np.zeros((4, 4), bool))


def test_classes_present_skips_background() -> None:
    label_map = np.zeros((10, 10), np.uint8)
    label_map[1, 1], label_map[2, 2] = 13, 2
    assert classes_present(label_map, 20) == [2, 13]
    assert classes_present(np.zeros((3, 3), np.uint8), 20) == []
