"""What one parsed photo yields: the object every downstream consumer (files, DICOM, web) reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dicom_node.parse.classes import CLASS_NAMES


@dataclass(frozen=True)
class PersonInstance:
    """A whole-person ("Human") instance kept by the model's score cut.

    ``index`` is the person's position in :attr:`ParsingResult.persons` (0-based); it is the
    person's tracking id in DICOM outputs (as ``index + 1``).
    """

    index: int
    score: float
    mask: np.ndarray  # bool (H, W) at the photo's size
    query_index: int


@dataclass(frozen=True)
class PartInstance:
    """A body-part or clothing instance (class 1..19) kept by the model's score cut.

    Parts are not per person in M2FP; ``person_index`` attributes the part to the person
    whose mask it overlaps most (None when it overlaps no person).
    """

    class_index: int
    label: str
    score: float
    mask_source: np.ndarray | Callable[[], np.ndarray]  # the mask, or how to draw it
    person_index: int | None
    query_index: int

    @property
    def mask(self) -> np.ndarray:
        """bool (H, W) at the photo's size. Drawn on demand for model results: a 12 MP photo
        with 80 parts would otherwise hold 1 GB of masks that most consumers never read."""
        source = self.mask_source
        return source() if callable(source) else source


@dataclass
class ParsingResult:
    """The parsing of one photo.

    ``label_map`` is uint8 (H, W): each pixel holds the class of the highest-scoring part
    instance that covers it, 0 (Background) where none does.
    """

    label_map: np.ndarray
    persons: list[PersonInstance]
    parts: list[PartInstance]
    model_digest: str
    model_untrained: bool
    class_names: tuple[str, ...] = CLASS_NAMES
    timings_s: dict[str, float] = field(default_factory=dict)
    runtime: str = "eager"  # the inference runtime that computed the network outputs

    @property
    def person_count(self) -> int:
        return len(self.persons)

    @property
    def size_hw(self) -> tuple[int, int]:
        return (int(self.label_map.shape[0]), int(self.label_map.shape[1]))

    def classes_present(self) -> list[int]:
        """Part classes (1..19) that own at least one label-map pixel, ascending."""
        from dicom_node.parse.counting import classes_present  # lazy: torch takes ~1 s to import

        return classes_present(self.label_map, len(self.class_names))


def result_from_label_map(
    label_map: np.ndarray,
    person_masks: list[np.ndarray] | None = None,
    model_digest: str = "label-map",
    model_untrained: bool = True,
) -> ParsingResult:
    """A result built from a given label map (one part instance per class, score 1.0).

    Lets the DICOM builders and the web side be tested and demonstrated without a network run.
    """
    label_map = np.ascontiguousarray(label_map, dtype=np.uint8)
    persons = [
        PersonInstance(index=i, score=1.0, mask=np.asarray(m, dtype=bool), query_index=-1)
        for i, m in enumerate(person_masks or [])
    ]
    parts = []
    for c in np.unique(label_map):
        if c == 0:
            continue
        mask = label_map == c
        overlaps = [int((mask & p.mask).sum()) for p in persons]
        owner = int(np.argmax(overlaps)) if overlaps and max(overlaps) > 0 else None
        parts.append(PartInstance(int(c), CLASS_NAMES[c], 1.0, mask, owner, -1))
    return ParsingResult(label_map, persons, parts, model_digest, model_untrained)
