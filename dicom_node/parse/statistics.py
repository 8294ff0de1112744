"""Region statistics of a parsing: how much of the image and of each person each body part covers.

Clinicians read these as burn-area or wound-extent estimates, so every figure says what its
denominator is: ``image_fraction`` is over all photo pixels, ``person_fraction`` over the pixels
of the person(s) (the union of the person masks for the whole-image figures).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dicom_node.parse.counting import class_counts
from dicom_node.parse.result import ParsingResult


@dataclass(frozen=True)
class RegionStats:
    """Area of one part class, in the whole image or inside one person."""

    class_index: int
    label: str
    pixels: int
    image_fraction: float
    person_fraction: float | None  # None when there is no person to divide by


@dataclass(frozen=True)
class PersonStats:
    """One person's area and the area of each part class inside that person's mask."""

    person_index: int
    score: float
    pixels: int
    image_fraction: float
    regions: list[RegionStats]


@dataclass(frozen=True)
class LesionRegionStats:
    """How much of one body region a lesion mask covers (the seed's burn-area example)."""

    class_index: int
    label: str
    region_pixels: int
    lesion_pixels: int
    lesion_percent: float


@dataclass(frozen=True)
class ParsingStatistics:
    image_pixels: int
    person_count: int
    person_pixels: int  # union of all person masks
    regions: list[RegionStats]
    persons: list[PersonStats]

    def to_dict(self) -> dict:
        return asdict(self)


def region_statistics(result: ParsingResult) -> ParsingStatistics:
    """Area per class present and per person, from the label map and the person masks."""
    label_map = result.label_map
    names = result.class_names
    n = len(names)
    image_pixels = int(label_map.size)
    counts = class_counts(label_map, n)

    if len(result.persons) == 1:
        person_union = np.asarray(result.persons[0].mask, dtype=bool)
    else:
        person_union = np.zeros(label_map.shape, dtype=bool)
        for person in result.persons:
            person_union |= person.mask
    person_pixels = int(np.count_nonzero(person_union))
    in_person = class_counts(label_map, n, person_union) if person_pixels else np.zeros(n, np.int64)

    regions = [
        RegionStats(
            class_index=c,
            label=names[c],
            pixels=int(counts[c]),
            image_fraction=float(counts[c]) / image_pixels,
            person_fraction=float(in_person[c]) / person_pixels if person_pixels else None,
        )
        for c in range(1, n)
        if counts[c] > 0
    ]

    persons = []
    for person in result.persons:
        area = int(np.count_nonzero(person.mask))
        per_class = in_person if len(result.persons) == 1 else class_counts(label_map, n, person.mask)
        persons.append(
            PersonStats(
                person_index=person.index,
                score=person.score,
                pixels=area,
                image_fraction=area / image_pixels,
                regions=[
                    RegionStats(c, names[c], int(per_class[c]), float(per_class[c]) / image_pixels,
                                float(per_class[c]) / area if area else None)
                    for c in range(1, n)
                    if per_class[c] > 0
                ],
            )
        )
    return ParsingStatistics(image_pixels, result.person_count, person_pixels, regions, persons)


def lesion_statistics(result: ParsingResult, lesion_mask: np.ndarray) -> list[LesionRegionStats]:
    """Percentage of each body region (label-map class) that the lesion mask covers.

    The mask must have the photo's size; any non-zero value counts as lesion.
    """
    if lesion_mask.shape[:2] != result.label_map.shape:
        raise ValueError(
            f"lesion mask is {lesion_mask.shape[1]}x{lesion_mask.shape[0]} but the photo is "
            f"{result.label_map.shape[1]}x{result.label_map.shape[0]} (width x height)"
        )
    lesion: np.ndarray = lesion_mask.astype(bool)
    if lesion.ndim == 3:
        lesion = np.any(lesion, axis=2)
    n = len(result.class_names)
    region = class_counts(result.label_map, n)
    hit = class_counts(result.label_map, n, lesion)
    return [
        LesionRegionStats(c, result.class_names[c], int(region[c]), int(hit[c]), float(100.0 * hit[c] / region[c]))
        for c in range(1, n)
        if region[c] > 0
    ]
