"""Estimated burnt share of the total body surface area (%TBSA) from parsed body photographs.

A burn's extent is given as a percentage of the total body surface area (TBSA), read from the
Lund and Browder chart (age-dependent) or, for adults, the rule of nines. Here the chart's body
parts are summed into the regions M2FP can see, each region's share is taken for the side of
the body the photo shows (anterior or posterior), and the lesion mask says which of the region's
*visible skin* is burnt.

What the figures mean, and what they do not:

- ``visible_share`` of a region (per view) = visible skin pixels / (visible skin pixels +
  pixels of the garments that cover that region). Covered skin is unknown, never "unburnt".
  A region with neither skin nor covering garment in the photo has ``visible_share`` 0.
  Parts of a region that are outside the photo or that the parser missed are not counted: the
  share is over the region's pixels in the photo.
- ``lesion_share`` = lesion pixels on the region's visible skin / visible skin pixels (None
  when no skin of the region is visible). Lesion pixels on clothing or background are ignored
  (with a warning).
- ``contribution_percent`` = chart percent of the region for that view x visible_share x
  lesion_share. ``percent`` = the sum of the contributions: the burnt share of the VISIBLE
  surface, as a percentage of the TBSA. Nothing is extrapolated to covered or unseen skin, so it
  is a lower bound of the burn's %TBSA; ``visible_percent`` = sum of chart percent x
  visible_share says how much of the TBSA was seen. When every region is fully visible in front
  and back photos, ``visible_percent`` is 100 and ``percent`` is the chart estimate.
- The photos are 2-D projections: a surface seen at a slant is under-counted. This is an
  estimate to support, not replace, the clinician's chart: not for diagnosis.

Chart sources (the one table, :data:`CHART`):

- Lund CC, Browder NC. The estimation of areas of burns. Surg Gynecol Obstet 1944;79:352-358,
  as commonly tabulated (e.g. in burn-care textbooks and the ANZBA/EMSB course chart): fixed
  shares for neck, trunk, buttocks, genitalia, upper arms, lower arms, hands and feet, and the
  age-dependent halves of the head (A), one thigh (B) and one lower leg (C) for the age columns
  under 1, 1-4, 5-9, 10-14, 15 years and adult.
- Wallace AB. The exposure treatment of burns. Lancet 1951;1(6653):501-504 (rule of nines):
  head and neck 9, each upper limb 9, anterior trunk 18, posterior trunk 18, each lower limb 18,
  perineum 1.

Aggregation into the M2FP regions (classes: Face + Hair -> head, Torso-skin -> trunk,
Left/Right-arm -> each upper limb, Left/Right-leg -> each lower limb):

- head = the chart's head. M2FP labels neck skin "Torso-skin", so the Lund-Browder neck goes to
  the trunk; the rule of nines has no separate neck (its 9 % "head and neck" stays the head).
- trunk = neck + trunk + buttocks (posterior) + genitalia / perineum (anterior).
- upper limb = upper arm + lower arm + hand; lower limb = thigh + leg + foot.
- Each part's share is split into an anterior and a posterior half (buttocks: all posterior;
  genitalia: all anterior; trunk: the chart's anterior and posterior trunk).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset

NOTE = "estimate from the visible surface of 2-D photos, not for diagnosis"


class View(StrEnum):
    """The side of the body a photo shows (the surface facing the camera)."""

    ANTERIOR = "anterior"
    POSTERIOR = "posterior"


class Method(StrEnum):
    """The chart the estimate is read from."""

    LUND_BROWDER = "lund-browder"
    RULE_OF_NINES = "rule-of-nines"


class AgeGroup(StrEnum):
    """The age columns of the Lund and Browder chart (1944)."""

    UNDER_1 = "under-1"
    AGE_1_4 = "1-4"
    AGE_5_9 = "5-9"
    AGE_10_14 = "10-14"
    AGE_15 = "15"
    ADULT = "adult"


class Region(StrEnum):
    """The body regions M2FP can see, into which the chart's parts are summed."""

    HEAD = "head"
    TRUNK = "trunk"
    LEFT_UPPER_LIMB = "left upper limb"
    RIGHT_UPPER_LIMB = "right upper limb"
    LEFT_LOWER_LIMB = "left lower limb"
    RIGHT_LOWER_LIMB = "right lower limb"


_AGES = tuple(AgeGroup)  # the column order of CHART: under-1, 1-4, 5-9, 10-14, 15, adult
_UPPER = (Region.LEFT_UPPER_LIMB, Region.RIGHT_UPPER_LIMB)
_LOWER = (Region.LEFT_LOWER_LIMB, Region.RIGHT_LOWER_LIMB)


def _same(value: float) -> tuple[float, ...]:
    return (value,) * len(_AGES)


# THE chart table. Row: (method, chart part, regions it goes to (one entry per side for a paired
# part), anterior percent per age column, posterior percent per age column), one side of a
# paired part. Age columns: under 1, 1-4, 5-9, 10-14, 15, adult. Sources in the module docstring.
# Lund and Browder: A (half of the head) 9.5 8.5 6.5 5.5 4.5 3.5; B (half of one thigh)
# 2.75 3.25 4 4.25 4.5 4.75; C (half of one lower leg) 2.5 2.5 2.75 3 3.25 3.5.
_A = (9.5, 8.5, 6.5, 5.5, 4.5, 3.5)
_B = (2.75, 3.25, 4.0, 4.25, 4.5, 4.75)
_C = (2.5, 2.5, 2.75, 3.0, 3.25, 3.5)
_NONE = _same(0.0)
CHART: tuple[tuple[Method, str, tuple[Region, ...], tuple[float, ...], tuple[float, ...]], ...] = (
    (Method.LUND_BROWDER, "head", (Region.HEAD,), _A, _A),
    (Method.LUND_BROWDER, "neck", (Region.TRUNK,), _same(1.0), _same(1.0)),
    (Method.LUND_BROWDER, "trunk", (Region.TRUNK,), _same(13.0), _same(13.0)),
    (Method.LUND_BROWDER, "buttock", (Region.TRUNK, Region.TRUNK), _NONE, _same(2.5)),
    (Method.LUND_BROWDER, "genitalia", (Region.TRUNK,), _same(1.0), _NONE),
    (Method.LUND_BROWDER, "upper arm", _UPPER, _same(2.0), _same(2.0)),
    (Method.LUND_BROWDER, "lower arm", _UPPER, _same(1.5), _same(1.5)),
    (Method.LUND_BROWDER, "hand", _UPPER, _same(1.25), _same(1.25)),
    (Method.LUND_BROWDER, "thigh", _LOWER, _B, _B),
    (Method.LUND_BROWDER, "leg", _LOWER, _C, _C),
    (Method.LUND_BROWDER, "foot", _LOWER, _same(1.75), _same(1.75)),
    # Rule of nines (Wallace 1951): one column for all ages (an adult rule).
    (Method.RULE_OF_NINES, "head and neck", (Region.HEAD,), _same(4.5), _same(4.5)),
    (Method.RULE_OF_NINES, "trunk", (Region.TRUNK,), _same(18.0), _same(18.0)),
    (Method.RULE_OF_NINES, "perineum", (Region.TRUNK,), _same(1.0), _NONE),
    (Method.RULE_OF_NINES, "upper limb", _UPPER, _same(4.5), _same(4.5)),
    (Method.RULE_OF_NINES, "lower limb", _LOWER, _same(9.0), _same(9.0)),
)


def chart_percent(method: Method, group: AgeGroup, view: View) -> dict[Region, float]:
    """Percent of the TBSA per region on one side of the body, summed from :data:`CHART`."""
    column = _AGES.index(group)
    shares = dict.fromkeys(Region, 0.0)
    for row_method, _part, regions, anterior, posterior in CHART:
        if row_method != method:
            continue
        for region in regions:
            shares[region] += (anterior if view == View.ANTERIOR else posterior)[column]
    return shares


# Skin classes (CIHP index) -> the region whose visible skin they are.
SKIN_REGIONS: Mapping[int, Region] = {
    13: Region.HEAD,  # Face
    2: Region.HEAD,  # Hair: the scalp under it counts as seen head surface (issue: Face + Hair -> head)
    10: Region.TRUNK,  # Torso-skin (neck, chest, belly, back)
    14: Region.LEFT_UPPER_LIMB,  # Left-arm
    15: Region.RIGHT_UPPER_LIMB,  # Right-arm
    16: Region.LEFT_LOWER_LIMB,  # Left-leg
    17: Region.RIGHT_LOWER_LIMB,  # Right-leg
}

# Garment and accessory classes (CIHP index) -> the regions whose skin they can cover. A pixel of a
# garment with several regions goes to the region whose visible skin is nearest to it (Euclidean
# distance transform; ties: the first listed), e.g. a sleeve's pixels go to the arm next to it and
# a trouser leg's to the leg below it. Where none of its regions shows skin the pixels go to the
# first listed: that region's visible_share is 0 whatever the count, so the choice changes nothing.
COVERING_REGIONS: Mapping[int, tuple[Region, ...]] = {
    1: (Region.HEAD,),  # Hat
    4: (Region.HEAD,),  # Sunglasses
    11: (Region.TRUNK,),  # Scarf: the neck, part of the trunk here (see the module docstring)
    5: (Region.TRUNK, *_UPPER),  # UpperClothes (sleeves cover the arms)
    7: (Region.TRUNK, *_UPPER),  # Coat
    6: (Region.TRUNK, *_LOWER),  # Dress
    12: _LOWER,  # Skirt
    9: _LOWER,  # Pants
    3: _UPPER,  # Gloves (the hands)
    8: _LOWER,  # Socks (the feet)
    18: (Region.LEFT_LOWER_LIMB,),  # Left-shoe
    19: (Region.RIGHT_LOWER_LIMB,),  # Right-shoe
}


def age_group(age_years: float | None) -> AgeGroup:
    """The Lund and Browder column of an age: under 1, 1-4, 5-9, 10-14, 15 (15 <= age < 16), adult.

    None (age unknown) gives ADULT; :func:`estimate_tbsa` then adds a warning.
    """
    if age_years is None:
        return AgeGroup.ADULT
    if age_years < 0:
        raise ValueError(f"age {age_years} years is negative")
    for limit, group in ((1, AgeGroup.UNDER_1), (5, AgeGroup.AGE_1_4), (10, AgeGroup.AGE_5_9),
                         (15, AgeGroup.AGE_10_14), (16, AgeGroup.AGE_15)):
        if age_years < limit:
            return group
    return AgeGroup.ADULT


_AGE_STRING = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _da(value: object) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """The patient's age at the study, in years; None if the dataset does not say.

    Patient's Age (0010,1010), VR AS "nnnD/W/M/Y" (PS3.5 6.2), first; else Patient's Birth Date
    (0010,0030) with the Study Date (0008,0020), else the Content, Series or Acquisition Date:
    completed years plus the fraction of the year since the last birthday. A birth date after
    the reference date gives None.
    """
    match = _AGE_STRING.match(str(ds.get("PatientAge", "") or ""))
    if match:
        return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]
    birth = _da(ds.get("PatientBirthDate"))
    if birth is None:
        return None
    for keyword in ("StudyDate", "ContentDate", "SeriesDate", "AcquisitionDate"):
        when = _da(ds.get(keyword))
        if when is not None:
            break
    else:
        return None
    if when < birth:
        return None
    years = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    try:
        last_birthday = birth.replace(year=birth.year + years)
    except ValueError:  # born on 29 February
        last_birthday = dt.date(birth.year + years, 3, 1)
    return years + (when - last_birthday).days / 365.25


# View Code Sequence (0054,0220) concepts for the side of the body facing the camera. SNOMED CT
# values as in pydicom's concept dictionary (PS3.16): Anterior 255549009 and Posterior 255551008
# (CID 2, 5), antero-posterior 399348003 and frontal 399033003 (CID 4010 DX View, CID 501),
# postero-anterior 272479007 (CID 4010), Anterior/Posterior projection 399321004 / 399001007
# (CID 26); the SNOMED RT forms R-10206 (antero-posterior) and R-10214 (postero-anterior) of
# older objects. A photograph sees the surface where a radiograph's beam enters: AP = anterior.
_VIEW_CODES: Mapping[tuple[str, str], View] = {
    **{(scheme, value): View.ANTERIOR for scheme in ("SCT", "SRT")
       for value in ("255549009", "399348003", "399033003", "399321004")},
    **{(scheme, value): View.POSTERIOR for scheme in ("SCT", "SRT")
       for value in ("255551008", "272479007", "399001007")},
    ("SRT", "R-10206"): View.ANTERIOR,
    ("SRT", "R-10214"): View.POSTERIOR,
}


def view_of(ds: Dataset) -> View | None:
    """The view of a photo from its View Code Sequence (0054,0220); None if absent or unknown."""
    for item in ds.get("ViewCodeSequence", None) or []:
        key = (str(item.get("CodingSchemeDesignator", "")).strip(), str(item.get("CodeValue", "")).strip())
        if key in _VIEW_CODES:
            return _VIEW_CODES[key]
    return None


def resize_mask(mask: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """A lesion mask resampled to ``shape_hw`` (bool), nearest neighbour (``cv2.INTER_NEAREST``).

    Nearest neighbour keeps the mask binary and invents no lesion edge; a mask drawn on a
    down-scaled copy of the photo is brought to the photo's (and label map's) size this way.
    """
    flat = np.asarray(mask)
    if flat.ndim == 3:
        flat = np.any(flat != 0, axis=2)
    src = (flat != 0).astype(np.uint8)
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if src.shape == (h, w):
        return src.astype(bool)
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


@dataclass(frozen=True)
class PhotoLesion:
    """One photo's parsing and lesion mask: ``label_map`` uint8 (H, W) CIHP class indices,
    ``lesion_mask`` bool (H, W) of the same size, and the side of the body it shows."""

    label_map: np.ndarray
    lesion_mask: np.ndarray
    view: View


@dataclass(frozen=True)
class RegionEstimate:
    """One region on one side of the body (see the module docstring for each figure)."""

    region: Region
    view: View
    chart_percent: float
    skin_pixels: int
    covered_pixels: int
    lesion_pixels: int
    visible_share: float
    lesion_share: float | None
    contribution_percent: float

    def to_json(self) -> dict[str, Any]:
        return {
            "region": str(self.region), "view": str(self.view), "chart_percent": self.chart_percent,
            "visible_share": self.visible_share, "lesion_share": self.lesion_share,
            "contribution_percent": self.contribution_percent, "skin_pixels": self.skin_pixels,
            "covered_pixels": self.covered_pixels, "lesion_pixels": self.lesion_pixels,
        }


@dataclass(frozen=True)
class TbsaEstimate:
    """The %TBSA estimate of one study's photos (see the module docstring)."""

    method: Method
    age_group: AgeGroup
    age_years: float | None
    view: str  # "anterior", "posterior" or "both"
    percent: float
    visible_percent: float
    regions: tuple[RegionEstimate, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": str(self.method), "age_group": str(self.age_group), "age_years": self.age_years,
            "view": self.view, "percent": self.percent, "visible_percent": self.visible_percent,
            "regions": [r.to_json() for r in self.regions], "warnings": list(self.warnings), "note": NOTE,
        }


@dataclass
class _Counts:
    skin: int = 0
    covered: int = 0
    lesion: int = 0


def _photo_counts(photo: PhotoLesion) -> tuple[dict[Region, _Counts], int]:
    """Skin, covering and lesion pixels per region of one photo; and lesion pixels off visible skin."""
    label_map = np.asarray(photo.label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label_map must be (H, W) class indices, got shape {label_map.shape}")
    lesion = np.asarray(photo.lesion_mask)
    if lesion.ndim == 3:
        lesion = np.any(lesion != 0, axis=2)
    if lesion.shape != label_map.shape:
        raise ValueError(f"lesion mask is {lesion.shape[1]}x{lesion.shape[0]} but the label map is "
                         f"{label_map.shape[1]}x{label_map.shape[0]} (width x height); see resize_mask")
    lesion = lesion != 0
    counts = {region: _Counts() for region in Region}
    per_class = np.bincount(label_map.ravel(), minlength=256)
    lesion_per_class = np.bincount(label_map[lesion].ravel(), minlength=256)
    skin_masks: dict[Region, np.ndarray] = {}
    for class_index, region in SKIN_REGIONS.items():
        counts[region].skin += int(per_class[class_index])
        counts[region].lesion += int(lesion_per_class[class_index])
    off_skin = int(lesion.sum()) - sum(int(lesion_per_class[c]) for c in SKIN_REGIONS)

    distances: dict[Region, np.ndarray] = {}

    def distance_to(region: Region) -> np.ndarray:
        if region not in distances:
            if region not in skin_masks:
                classes = [c for c, r in SKIN_REGIONS.items() if r == region]
                skin_masks[region] = np.isin(label_map, classes)
            not_skin = (~skin_masks[region]).astype(np.uint8)
            distances[region] = cv2.distanceTransform(not_skin, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return distances[region]

    for class_index, regions in COVERING_REGIONS.items():
        pixels = int(per_class[class_index])
        if pixels == 0:
            continue
        with_skin = [r for r in regions if counts[r].skin > 0]
        if len(with_skin) <= 1:
            counts[with_skin[0] if with_skin else regions[0]].covered += pixels
            continue
        garment = label_map == class_index
        nearest = np.argmin(np.stack([distance_to(r)[garment] for r in with_skin]), axis=0)
        for i, region in enumerate(with_skin):
            counts[region].covered += int(np.count_nonzero(nearest == i))
    return counts, off_skin


def estimate_tbsa(photos: Sequence[PhotoLesion], age_years: float | None,
                  method: Method = Method.LUND_BROWDER) -> TbsaEstimate:
    """Combine one study's photos (front and/or back) into one %TBSA estimate.

    Photos with the same view are pooled by pixels (counts summed) before the shares are taken;
    each view contributes its side's chart shares. See the module docstring for the figures.
    """
    if not photos:
        raise ValueError("estimate_tbsa needs at least one photo")
    method = Method(method)
    group = age_group(age_years)
    warnings: list[str] = []
    if age_years is None:
        warnings.append("patient age unknown: the adult chart was used")
    if method == Method.RULE_OF_NINES and group != AgeGroup.ADULT:
        warnings.append(f"the rule of nines is an adult rule; for age group {group} use the Lund-Browder chart")

    pooled: dict[View, dict[Region, _Counts]] = {}
    for index, photo in enumerate(photos):
        view = View(photo.view)
        counts, off_skin = _photo_counts(photo)
        if off_skin:
            warnings.append(f"photo {index + 1}: {off_skin} lesion pixel(s) not on visible skin were ignored")
        total = pooled.setdefault(view, {region: _Counts() for region in Region})
        for region, c in counts.items():
            total[region].skin += c.skin
            total[region].covered += c.covered
            total[region].lesion += c.lesion

    rows: list[RegionEstimate] = []
    for view in (View.ANTERIOR, View.POSTERIOR):
        if view not in pooled:
            continue
        chart = chart_percent(method, group, view)
        for region in Region:
            c = pooled[view][region]
            seen = c.skin + c.covered
            visible_share = c.skin / seen if seen else 0.0
            lesion_share = c.lesion / c.skin if c.skin else None
            contribution = chart[region] * visible_share * (lesion_share or 0.0)
            rows.append(RegionEstimate(region, view, chart[region], c.skin, c.covered, c.lesion,
                                       visible_share, lesion_share, contribution))
    if len(pooled) == 1:
        view_text = str(next(iter(pooled)))
        other = View.POSTERIOR if view_text == View.ANTERIOR else View.ANTERIOR
        warnings.append(f"no {other} photo: the {other} surface was not seen")
    else:
        view_text = "both"
    return TbsaEstimate(
        method=method,
        age_group=group,
        age_years=age_years,
        view=view_text,
        percent=sum(r.contribution_percent for r in rows),
        visible_percent=sum(r.chart_percent * r.visible_share for r in rows),
        regions=tuple(rows),
        warnings=tuple(warnings),
    )
