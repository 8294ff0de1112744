"""Region statistics recomputed pixel by pixel with plain numpy, for 0, 1 and 2 overlapping persons."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.parse.result import result_from_label_map
from dicom_node.parse.statistics import lesion_statistics, region_statistics


def _label_map() -> np.ndarray:
    rng = np.random.default_rng(7)
    label_map = np.zeros((120, 90), np.uint8)
    for class_index in (2, 5, 13, 14):
        top, left = rng.integers(0, 80), rng.integers(0, 60)
        label_map[top:top + 30, left:left + 25] = class_index
    return label_map


def _persons(count: int) -> list[np.ndarray]:
    masks = []
    for i in range(count):
        mask = np.zeros((120, 90), bool)
        mask[10 + 20 * i:100, 5 + 25 * i:70 + 10 * i] = True  # the two overlap
        masks.append(mask)
    return masks


@pytest.mark.parametrize("person_count", [0, 1, 2])
def test_region_statistics_by_definition(person_count: int) -> None:
    label_map = _label_map()
    masks = _persons(person_count)
    stats = region_statistics(result_from_label_map(label_map, masks))
    union = np.logical_or.reduce(masks) if masks else np.zeros(label_map.shape, bool)

    assert stats.image_pixels == label_map.size
    assert stats.person_count == person_count
    assert stats.person_pixels == int(union.sum())
    present = [c for c in range(1, 20) if (label_map == c).any()]
    assert [r.class_index for r in stats.regions] == present
    for region in stats.regions:
        pixels = int((label_map == region.class_index).sum())
        assert region.pixels == pixels
        assert region.image_fraction == pytest.approx(pixels / label_map.size)
        if person_count:
            inside = int(((label_map == region.class_index) & union).sum())
            assert region.person_fraction == pytest.approx(inside / union.sum())
        else:
            assert region.person_fraction is None

    assert len(stats.persons) == person_count
    for person, mask in zip(stats.persons, masks, strict=True):
        assert person.pixels == int(mask.sum())
        assert person.image_fraction == pytest.approx(mask.sum() / label_map.size)
        expected = {c: int(((label_map == c) & mask).sum()) for c in range(1, 20)}
        assert {r.class_index: r.pixels for r in person.regions} == {c: n for c, n in expected.items() if n}
        for region in person.regions:
            assert region.person_fraction == pytest.approx(expected[region.class_index] / mask.sum())


def test_lesion_statistics_by_definition() -> None:
    label_map = _label_map()
    lesion = np.zeros(label_map.shape, np.uint8)
    lesion[40:80, 20:60] = 255
    rows = lesion_statistics(result_from_label_map(label_map), lesion)
    for row in rows:
        region = label_map == row.class_index
        assert row.region_pixels == int(region.sum())
        assert row.lesion_pixels == int((region & (lesion > 0)).sum())
        assert row.lesion_percent == pytest.approx(100 * row.lesion_pixels / row.region_pixels)
    assert [r.class_index for r in rows] == [c for c in range(1, 20) if (label_map == c).any()]
