"""Estimated %TBSA (``dicom_node.parse.tbsa``), its JSON, its SR groups and the CLI, by construction.

Expected numbers come from this file's own copy of the few chart values it needs, from
Lund CC, Browder NC, Surg Gynecol Obstet 1944;79:352-358 (as commonly tabulated) and Wallace AB,
Lancet 1951 (rule of nines), and from pixel counts of the hand-built label maps below.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from dicom_node.encode.validate import dciodvfy_available, validate
from dicom_node.parse.tbsa import (
    AgeGroup,
    Method,
    PhotoLesion,
    View,
    age_group,
    estimate_tbsa,
    patient_age_years,
    resize_mask,
    view_of,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb, write_dataset

# Lund and Browder, adult column, one side (anterior = posterior for these): head A 3.5; thigh B 4.75,
# leg C 3.5, foot 1.75 -> one lower limb 10; upper arm 2 + lower arm 1.5 + hand 1.25 -> one upper limb 4.75.
# Trunk anterior = neck 1 + anterior trunk 13 + genitalia 1 = 15; posterior = neck 1 + trunk 13 + buttocks 2 x 2.5 = 19.
LB_ADULT_HEAD_SIDE = 3.5
LB_ADULT_UPPER_LIMB_SIDE = 2 + 1.5 + 1.25
LB_ADULT_LOWER_LIMB_SIDE = 4.75 + 3.5 + 1.75
LB_TRUNK_ANTERIOR = 1 + 13 + 1
LB_TRUNK_POSTERIOR = 1 + 13 + 2.5 + 2.5
# Age 1-4: A 8.5, B 3.25, C 2.5.
LB_1_4_HEAD_SIDE = 8.5
LB_1_4_LOWER_LIMB_SIDE = 3.25 + 2.5 + 1.75
# Rule of nines, one side: head (and neck) 4.5, upper limb 4.5, lower limb 9, anterior trunk 18 + perineum 1.
RON_HEAD_SIDE, RON_UPPER_LIMB_SIDE, RON_LOWER_LIMB_SIDE, RON_TRUNK_ANTERIOR = 4.5, 4.5, 9.0, 19.0

FACE, HAIR, TORSO, L_ARM, R_ARM, L_LEG, R_LEG = 13, 2, 10, 14, 15, 16, 17
UPPER_CLOTHES, PANTS = 5, 9


def body() -> np.ndarray:
    """A 100x100 figure: face 10x20, torso 40x40, each arm 40x10, each leg 50x20 (no clothes)."""
    lm = np.zeros((100, 100), np.uint8)
    lm[0:10, 40:60] = FACE  # 200 px
    lm[10:50, 30:70] = TORSO  # 1600 px
    lm[10:50, 20:30] = R_ARM  # 400 px (image left in an anterior view)
    lm[10:50, 70:80] = L_ARM  # 400 px
    lm[50:100, 30:50] = R_LEG  # 1000 px
    lm[50:100, 50:70] = L_LEG  # 1000 px
    return lm


def rows_by_region(estimate, view: str = "anterior") -> dict[str, dict]:
    return {r["region"]: r for r in estimate.to_json()["regions"] if r["view"] == view}


def test_adult_anterior_uncovered() -> None:
    lm = body()
    lesion = np.zeros_like(lm, bool)
    lesion[10:30, 30:70] = True  # 800 of the torso's 1600 px
    lesion[10:20, 70:80] = True  # 100 of the left arm's 400 px
    estimate = estimate_tbsa([PhotoLesion(lm, lesion, View.ANTERIOR)], 40)
    expected = LB_TRUNK_ANTERIOR * 800 / 1600 + LB_ADULT_UPPER_LIMB_SIDE * 100 / 400
    assert estimate.percent == pytest.approx(expected)
    visible = LB_ADULT_HEAD_SIDE + LB_TRUNK_ANTERIOR + 2 * LB_ADULT_UPPER_LIMB_SIDE + 2 * LB_ADULT_LOWER_LIMB_SIDE
    assert estimate.visible_percent == pytest.approx(visible)
    doc = estimate.to_json()
    assert (doc["method"], doc["age_group"], doc["view"]) == ("lund-browder", "adult", "anterior")
    assert "not for diagnosis" in doc["note"]
    rows = rows_by_region(estimate)
    assert rows["trunk"]["chart_percent"] == pytest.approx(LB_TRUNK_ANTERIOR)
    assert rows["trunk"]["lesion_share"] == pytest.approx(0.5)
    assert rows["left upper limb"]["contribution_percent"] == pytest.approx(LB_ADULT_UPPER_LIMB_SIDE / 4)
    assert rows["right upper limb"]["lesion_share"] == 0.0
    assert not any("age unknown" in w for w in doc["warnings"])


def test_child_1_4_posterior() -> None:
    lm = body()
    lm[0:10, 40:60] = HAIR  # the back of the head
    lesion = np.zeros_like(lm, bool)
    lesion[0:5, 40:60] = True  # half of the head
    lesion[50:100, 50:60] = True  # half of the left leg
    estimate = estimate_tbsa([PhotoLesion(lm, lesion, View.POSTERIOR)], 3)
    assert estimate.age_group == AgeGroup.AGE_1_4
    expected = LB_1_4_HEAD_SIDE * 0.5 + LB_1_4_LOWER_LIMB_SIDE * 0.5
    assert estimate.percent == pytest.approx(expected)
    rows = rows_by_region(estimate, "posterior")
    assert rows["trunk"]["chart_percent"] == pytest.approx(LB_TRUNK_POSTERIOR)
    assert rows["head"]["chart_percent"] == pytest.approx(LB_1_4_HEAD_SIDE)


def test_front_and_back_combine_per_study() -> None:
    lm = body()
    front = np.zeros_like(lm, bool)
    front[10:50, 30:70] = True  # the whole torso, front
    back = np.zeros_like(lm, bool)
    back[10:30, 30:70] = True  # half the torso, back
    estimate = estimate_tbsa([PhotoLesion(lm, front, View.ANTERIOR), PhotoLesion(lm, back, View.POSTERIOR)], None)
    assert estimate.view == "both"
    assert estimate.percent == pytest.approx(LB_TRUNK_ANTERIOR + LB_TRUNK_POSTERIOR / 2)
    assert estimate.visible_percent == pytest.approx(100.0)  # every region fully seen from both sides
    # Two photos of the same view pool their pixels: 1600 lesion px of 3200 torso px.
    pooled = estimate_tbsa([PhotoLesion(lm, front, View.ANTERIOR),
                            PhotoLesion(lm, np.zeros_like(front), View.ANTERIOR)], None)
    assert pooled.percent == pytest.approx(LB_TRUNK_ANTERIOR * 1600 / 3200)


def test_clothed_region_counts_only_visible_skin() -> None:
    lm = np.zeros((100, 100), np.uint8)
    lm[0:10, 40:60] = FACE
    lm[10:30, 30:70] = TORSO  # 800 px of skin
    lm[30:50, 30:70] = UPPER_CLOTHES  # 800 px of shirt over the trunk
    lesion = np.zeros_like(lm, bool)
    lesion[10:20, 30:70] = True  # 400 px on skin
    lesion[30:50, 30:70] = True  # on the shirt: ignored, never extrapolated
    estimate = estimate_tbsa([PhotoLesion(lm, lesion, View.ANTERIOR)], 30)
    trunk = rows_by_region(estimate)["trunk"]
    assert trunk["visible_share"] == pytest.approx(800 / 1600)
    assert trunk["lesion_share"] == pytest.approx(400 / 800)
    assert estimate.percent == pytest.approx(LB_TRUNK_ANTERIOR * 0.5 * 0.5)
    assert any("not on visible skin" in w for w in estimate.warnings)
    # regions not in the photo: nothing seen, no lesion share
    assert rows_by_region(estimate)["left lower limb"]["visible_share"] == 0.0
    assert rows_by_region(estimate)["left lower limb"]["lesion_share"] is None


def test_pants_split_between_legs_by_nearest_skin() -> None:
    lm = body()
    lm[50:70, 30:70] = PANTS  # shorts: 20 rows over each leg's 20 columns
    lesion = np.zeros_like(lm, bool)
    lesion[70:100, 50:70] = True  # all of the left leg's visible skin (600 px)
    estimate = estimate_tbsa([PhotoLesion(lm, lesion, View.ANTERIOR)], 30)
    rows = rows_by_region(estimate)
    for side in ("left lower limb", "right lower limb"):
        assert rows[side]["visible_share"] == pytest.approx(600 / 1000)
    assert estimate.percent == pytest.approx(LB_ADULT_LOWER_LIMB_SIDE * 0.6)


def test_empty_mask_is_zero_and_full_mask_is_visible_percent() -> None:
    lm = body()
    lm[30:50, 30:70] = UPPER_CLOTHES  # away from the arms? no: adjacent, so some shirt goes to the arms
    empty = estimate_tbsa([PhotoLesion(lm, np.zeros_like(lm, bool), View.ANTERIOR)], 30)
    assert empty.percent == 0.0
    full = estimate_tbsa([PhotoLesion(lm, np.isin(lm, [FACE, TORSO, L_ARM, R_ARM, L_LEG, R_LEG]), View.ANTERIOR)], 30)
    assert full.percent == pytest.approx(full.visible_percent)
    assert full.visible_percent == pytest.approx(empty.visible_percent)
    assert full.visible_percent < 48.0  # the adult anterior half is 48 %; the shirt hides part of it


def test_unknown_age_is_adult_with_warning() -> None:
    lm = body()
    estimate = estimate_tbsa([PhotoLesion(lm, lm == FACE, View.ANTERIOR)], None)
    assert estimate.age_group == AgeGroup.ADULT
    assert any("age unknown" in w for w in estimate.to_json()["warnings"])
    assert estimate.percent == pytest.approx(LB_ADULT_HEAD_SIDE)


def test_rule_of_nines() -> None:
    lm = body()
    lesion = np.isin(lm, [FACE, L_ARM, L_LEG, TORSO])
    estimate = estimate_tbsa([PhotoLesion(lm, lesion, View.ANTERIOR)], 40, Method.RULE_OF_NINES)
    assert estimate.percent == pytest.approx(RON_HEAD_SIDE + RON_UPPER_LIMB_SIDE + RON_LOWER_LIMB_SIDE
                                             + RON_TRUNK_ANTERIOR)
    assert estimate.to_json()["method"] == "rule-of-nines"
    child = estimate_tbsa([PhotoLesion(lm, lesion, View.ANTERIOR)], 3, Method.RULE_OF_NINES)
    assert any("adult rule" in w for w in child.warnings)


def test_age_groups_and_patient_age() -> None:
    assert [age_group(a) for a in (0.5, 1, 4.9, 5, 10, 15, 15.9, 16, None)] == [
        AgeGroup.UNDER_1, AgeGroup.AGE_1_4, AgeGroup.AGE_1_4, AgeGroup.AGE_5_9, AgeGroup.AGE_10_14,
        AgeGroup.AGE_15, AgeGroup.AGE_15, AgeGroup.ADULT, AgeGroup.ADULT]
    ds = Dataset()
    ds.PatientAge = "004Y"
    assert patient_age_years(ds) == 4
    ds.PatientAge = "018M"
    assert patient_age_years(ds) == pytest.approx(1.5)
    ds.PatientAge = "010W"
    assert patient_age_years(ds) == pytest.approx(70 / 365.25)
    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate = "20150610", "20240609"
    days_since_birthday = (dt.date(2024, 6, 9) - dt.date(2023, 6, 10)).days
    assert patient_age_years(ds) == pytest.approx(8 + days_since_birthday / 365.25)
    assert age_group(patient_age_years(ds)) == AgeGroup.AGE_5_9
    assert patient_age_years(Dataset()) is None
    ds = Dataset()
    ds.PatientBirthDate = "20150610"  # no reference date
    assert patient_age_years(ds) is None


def _view_ds(scheme: str, value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, "view"
    ds = Dataset()
    ds.ViewCodeSequence = [item]
    return ds


def test_view_of_view_code_sequence() -> None:
    assert view_of(_view_ds("SCT", "255551008")) == View.POSTERIOR  # Posterior
    assert view_of(_view_ds("SCT", "255549009")) == View.ANTERIOR  # Anterior
    assert view_of(_view_ds("SCT", "399348003")) == View.ANTERIOR  # antero-posterior
    assert view_of(_view_ds("SCT", "272479007")) == View.POSTERIOR  # postero-anterior
    assert view_of(_view_ds("SCT", "399198007")) is None  # right lateral: neither
    assert view_of(Dataset()) is None


def test_resize_mask_nearest_neighbour() -> None:
    small = np.zeros((10, 10), bool)
    small[0:5, :] = True
    big = resize_mask(small, (100, 50))
    assert big.shape == (100, 50) and big.dtype == bool
    assert big[:50].all() and not big[50:].any()
    with pytest.raises(ValueError, match="resize_mask"):
        estimate_tbsa([PhotoLesion(body(), small, View.ANTERIOR)], None)


# --- SR ------------------------------------------------------------------------------------------

def _sr_groups(sr: Dataset) -> dict[str, dict[str, float | str]]:
    """Tracking identifier -> {concept code value: NUM value or CODE value} of each measurement group."""
    groups: dict[str, dict[str, float | str]] = {}

    def walk(items) -> None:
        for item in items:
            content = getattr(item, "ContentSequence", None)
            if content is None:
                continue
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "CONTAINER" and name == "Measurement Group":
                values: dict[str, float | str] = {}
                tracking = ""
                for child in content:
                    concept = child.ConceptNameCodeSequence[0].CodeValue
                    if child.ValueType == "TEXT" and concept == "112039":  # Tracking Identifier
                        tracking = child.TextValue
                    elif child.ValueType == "NUM":
                        # Floating Point Value when DS cannot hold the value exactly (C.18.1.1)
                        measured = child.MeasuredValueSequence[0]
                        values[concept] = float(measured.get("FloatingPointValue", measured.NumericValue))
                    elif child.ValueType == "CODE":
                        values[concept] = child.ConceptCodeSequence[0].CodeValue
                groups[tracking] = values
            walk(content)

    walk(sr.ContentSequence)
    return groups


def assert_sr_matches_json(sr: Dataset, tbsa_json: dict) -> None:
    groups = _sr_groups(sr)
    top = groups["Estimated %TBSA"]
    assert top["TBSA-PCT"] == pytest.approx(tbsa_json["percent"], rel=1e-12, abs=1e-12)
    assert top["TBSA-VIS-PCT"] == pytest.approx(tbsa_json["visible_percent"], rel=1e-12, abs=1e-12)
    assert top["TBSA-METHOD"] == tbsa_json["method"].upper()
    assert top["TBSA-AGE-GROUP"] == "AGE-" + tbsa_json["age_group"].upper()
    assert len(tbsa_json["regions"]) >= 6
    for row in tbsa_json["regions"]:
        group = groups[f"%TBSA {row['region']} {row['view']}"]
        assert group["TBSA-CHART-PCT"] == pytest.approx(row["chart_percent"], rel=1e-12)
        assert group["TBSA-VIS-SHARE"] == pytest.approx(row["visible_share"], rel=1e-12, abs=1e-12)
        assert group["TBSA-CONTRIB"] == pytest.approx(row["contribution_percent"], rel=1e-12, abs=1e-12)
        if row["lesion_share"] is None:
            assert "TBSA-LES-SHARE" not in group
        else:
            assert group["TBSA-LES-SHARE"] == pytest.approx(row["lesion_share"], rel=1e-12, abs=1e-12)


def test_sr_carries_the_estimate_and_the_lesion_seg(tmp_path: Path) -> None:
    from dicom_node.encode.results import encode_results
    from dicom_node.parse.result import result_from_label_map

    lm = body()
    lm[30:50, 30:70] = UPPER_CLOTHES
    photo = make_vl_photo(synthetic_rgb(100, 100))
    result = result_from_label_map(lm, [lm > 0])
    lesion = np.zeros_like(lm, bool)
    lesion[10:20, 20:80] = True
    tbsa = estimate_tbsa([PhotoLesion(lm, lesion, View.ANTERIOR)], 7)
    # a "received" lesion SEG: any SEG of this photo will do for the reference
    lesion_seg = encode_results(photo, None, result_from_label_map(np.where(lesion, 13, 0)),
                                np.zeros((100, 100, 3), np.uint8)).seg
    assert lesion_seg is not None
    encoded = encode_results(photo, None, result, np.zeros((100, 100, 3), np.uint8), lesion_mask=lesion,
                             tbsa=tbsa, lesion_seg=lesion_seg)
    assert encoded.seg is not None
    path = tmp_path / "sr.dcm"
    encoded.sr.save_as(path, enforce_file_format=True)
    sr = pydicom.dcmread(path)
    assert_sr_matches_json(sr, json.loads(json.dumps(tbsa.to_json())))
    evidence = {ref.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert {photo.SOPInstanceUID, lesion_seg.SOPInstanceUID, encoded.seg.SOPInstanceUID} <= evidence
    if dciodvfy_available():
        assert validate(path).errors == []


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_lesion_mask_dicom_writes_tbsa_in_json_and_sr(small_model_dir: Path, tmp_path: Path) -> None:
    rgb = synthetic_rgb(120, 160)
    photo_ds = make_vl_photo(rgb, PatientAge="003Y")
    src = write_dataset(photo_ds, tmp_path / "photo.dcm")
    mask = np.zeros((120, 160), np.uint8)
    mask[:, :80] = 255
    mask_path = tmp_path / "lesion.png"
    Image.fromarray(mask).save(mask_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dicom_node", "parse", str(src), "--dicom", "--out", str(out),
                           "--model-dir", str(small_model_dir), "--no-progress", "--lesion-mask", str(mask_path),
                           "--view", "posterior"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "photo.json").read_text())
    tbsa = report["tbsa"]
    assert tbsa["age_group"] == "1-4"  # from Patient's Age 003Y
    assert tbsa["view"] == "posterior"  # the option
    assert not any("view unknown" in w for w in tbsa["warnings"])
    # chart shares of the posterior 1-4 column, whatever the untrained model found
    rows = {r["region"]: r for r in tbsa["regions"]}
    assert rows["head"]["chart_percent"] == pytest.approx(LB_1_4_HEAD_SIDE)
    assert rows["trunk"]["chart_percent"] == pytest.approx(LB_TRUNK_POSTERIOR)
    assert tbsa["percent"] == pytest.approx(sum(r["contribution_percent"] for r in tbsa["regions"]))
    sr = pydicom.dcmread(out / "photo_sr.dcm")
    assert_sr_matches_json(sr, tbsa)
    if dciodvfy_available():
        assert validate(out / "photo_sr.dcm").errors == []


def test_parse_report_without_view_warns() -> None:
    from dicom_node.parse.report import parse_report
    from dicom_node.parse.result import result_from_label_map

    lm = body()
    report = parse_report(result_from_label_map(lm, [lm > 0]), "x", lm == TORSO, age_years=30)
    assert report["tbsa"]["view"] == "anterior"
    assert any("view unknown" in w for w in report["tbsa"]["warnings"])
    assert report["tbsa"]["percent"] == pytest.approx(LB_TRUNK_ANTERIOR)
    assert "tbsa" not in parse_report(result_from_label_map(lm, [lm > 0]), "x")


def test_cli_combines_front_and_back_photos_into_study_tbsa(small_model_dir: Path, tmp_path: Path) -> None:
    """Two photos given together, front and back: each keeps its own estimate, and study_tbsa.json has
    one estimate of both (each view's rows as the photo's own; lesion shares recounted here from the
    label maps the CLI wrote and the masks)."""
    paths, masks = [], []
    for name, flip in (("front", False), ("back", True)):
        rgb = np.ascontiguousarray(synthetic_rgb(120, 160)[:, ::-1] if flip else synthetic_rgb(120, 160))
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
        mask = np.zeros((120, 160), np.uint8)
        mask[30:100, 40:140] = 255
        Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
        paths.append(tmp_path / f"{name}.png")
        masks.append(mask > 0)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dicom_node", "parse", *map(str, paths), "--out", str(out), "--model-dir",
            str(small_model_dir), "--no-progress", "--lesion-mask", str(tmp_path / "front_mask.png"),
            "--lesion-mask", str(tmp_path / "back_mask.png"), "--age", "40"]
    wrong = subprocess.run([*args, "--view", "anterior", "--view", "posterior", "--view", "anterior"],
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "3 --view for 2 photos" in wrong.stderr
    proc = subprocess.run([*args, "--view", "anterior", "--view", "posterior"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    (study,) = json.loads((out / "study_tbsa.json").read_text())["studies"]
    assert [(p["view"], p["view_from"]) for p in study["photos"]] == [("anterior", "option"), ("posterior", "option")]
    tbsa = study["tbsa"]
    assert tbsa["view"] == "both" and tbsa["age_group"] == "adult"
    combined = {(r["region"], r["view"]): r for r in tbsa["regions"]}
    skin_classes = {"head": (2, 13), "trunk": (10,), "left upper limb": (14,), "right upper limb": (15,),
                    "left lower limb": (16,), "right lower limb": (17,)}
    for name, view, mask in (("front", "anterior", masks[0]), ("back", "posterior", masks[1])):
        own = {r["region"]: r for r in json.loads((out / f"{name}.json").read_text())["tbsa"]["regions"]}
        labels = np.asarray(Image.open(out / f"{name}_labels.png"))
        assert any(np.isin(labels, c).any() for c in skin_classes.values()), "some skin to compare"
        for region, classes in skin_classes.items():
            assert combined[(region, view)] == own[region], f"{name} {region}: the photo's own row"
            skin = np.isin(labels, classes)
            expected = np.count_nonzero(skin & mask) / np.count_nonzero(skin) if skin.any() else None
            assert combined[(region, view)]["lesion_share"] == pytest.approx(expected), f"{name} {region}"
    assert tbsa["percent"] == pytest.approx(sum(r["contribution_percent"] for r in tbsa["regions"]))
    assert combined[("trunk", "posterior")]["chart_percent"] == pytest.approx(LB_TRUNK_POSTERIOR)
    assert "burnt of" in proc.stderr
