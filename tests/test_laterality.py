"""General Series Body Part Examined and Laterality (PS3.3 C.7.3.1) on the SEG and the SC.

Laterality is Type 2C (paired body parts), and dciodvfy checks it per IOD: never on a SEG; on
the SC required for a paired (or unknown, or no) Body Part Examined, forbidden for an unpaired
one (dicom_node.encode.body_parts). Every case runs the real dciodvfy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.encode.body_parts import UNPAIRED_BODY_PARTS, is_unpaired
from dicom_node.encode.results import encode_results
from dicom_node.encode.validate import dciodvfy_available, validate
from dicom_node.parse.result import result_from_label_map
from tests.photo_factory import make_vl_photo, synthetic_rgb

H, W = 60, 80
pytestmark = pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")

# dciodvfy warnings tolerated here: our private coding scheme, a Body Part Examined outside its
# defined terms (SKIN, TRUNK, FOOBAR: the photo's value, passed on), and the reminder that an
# empty Laterality means "unknown" (which is the truth when the photo does not say).
TOLERATED_WARNINGS = (
    "Unrecognized defined term <99M2FP> for value 1 of attribute <Coding Scheme Designator>",
    "for value 1 of attribute <Body Part Examined>",
    "only permitted to be empty when actually unknown",
)

PAIRED = ("ARM", "HAND", "LEG", "SKIN", "TRUNK", "EXTREMITY", "SHOULDER", "EYE", "BREAST", "HIP", "TOE")
UNPAIRED = ("HEAD", "ABDOMEN", "WHOLEBODY", "FACE", "BACK", "NECK", "SCALP", "CHEST", "URETER")
UNKNOWN = ("FOOBAR",)


def _parsing():
    lm = np.zeros((H, W), dtype=np.uint8)
    lm[10:30, 10:30] = 10  # Torso-skin
    lm[30:50, 40:70] = 13  # Face
    return result_from_label_map(lm, [lm > 0])


def _encode(body_part: str | None, laterality: str | None, tmp_path: Path) -> dict[str, Path]:
    photo = make_vl_photo(synthetic_rgb(H, W), BodyPartExamined=body_part, Laterality=laterality)
    encoded = encode_results(photo, None, _parsing(), synthetic_rgb(H, W))
    assert encoded.seg is not None
    paths = {}
    for name, ds in (("seg", encoded.seg), ("sc", encoded.sc)):
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


def _assert_valid(path: Path, name: str) -> None:
    report = validate(path)
    assert report.errors == [], f"dciodvfy errors for the {name}:\n" + "\n".join(report.errors)
    unexpected = [w for w in report.warnings if not any(t in w for t in TOLERATED_WARNINGS)]
    assert unexpected == [], f"unexpected dciodvfy warnings for the {name}: {unexpected}"


@pytest.mark.parametrize("laterality", ["L", None], ids=["lateral-L", "no-laterality"])
@pytest.mark.parametrize("body_part", [*PAIRED, *UNPAIRED, *UNKNOWN, None])
def test_seg_and_sc_body_context_pass_dciodvfy(body_part, laterality, tmp_path):
    paths = _encode(body_part, laterality, tmp_path)
    for name, path in paths.items():
        _assert_valid(path, name)
    seg, sc = pydicom.dcmread(paths["seg"]), pydicom.dcmread(paths["sc"])

    assert "Laterality" not in seg  # never on the SEG
    for ds in (seg, sc):
        if body_part is None:
            assert "BodyPartExamined" not in ds
        else:
            assert ds.BodyPartExamined == body_part

    if body_part in UNPAIRED:
        assert "Laterality" not in sc  # absent, even when the photo has one
    elif laterality == "L":
        assert sc.Laterality == "L"
    else:  # paired, unknown term or no body part, and the photo does not say: empty, unknown
        assert "Laterality" in sc and sc.Laterality == ""


def test_photo_with_empty_laterality_is_like_none(tmp_path):
    paths = _encode("ARM", "", tmp_path)
    for name, path in paths.items():
        _assert_valid(path, name)
    assert pydicom.dcmread(paths["sc"]).Laterality == ""
    assert "Laterality" not in pydicom.dcmread(paths["seg"])


def test_is_unpaired_compares_like_dciodvfy():
    assert is_unpaired("HEAD") and is_unpaired("HEAD ")
    assert not is_unpaired("head")  # dciodvfy is case-sensitive: "head" needs a Laterality
    assert not is_unpaired(None) and not is_unpaired("")
    assert not any(is_unpaired(term) for term in (*PAIRED, *UNKNOWN))
    assert all(is_unpaired(term) for term in UNPAIRED)


def _laterality_errors(sc: Dataset, body_part: str, laterality: str | None, path: Path) -> list[str]:
    ds = copy.deepcopy(sc)
    ds.BodyPartExamined = body_part
    if "Laterality" in ds:
        del ds.Laterality
    if laterality is not None:
        ds.Laterality = laterality
    ds.save_as(path, enforce_file_format=True)
    return [e for e in validate(path).errors if "Laterality" in e]


def test_unpaired_table_matches_installed_dciodvfy(tmp_path):
    """Every term of the table is unpaired for this dciodvfy (absent passes, empty fails), and
    the paired samples are not: a dicom3tools upgrade that changes its list fails here
    (regenerate the table with scripts/probe_laterality.py)."""
    photo = make_vl_photo(synthetic_rgb(H, W), BodyPartExamined="ARM")
    sc = encode_results(photo, None, _parsing(), synthetic_rgb(H, W)).sc
    path = tmp_path / "sc.dcm"
    disagree = []
    for term in sorted(UNPAIRED_BODY_PARTS):
        if _laterality_errors(sc, term, None, path) or not _laterality_errors(sc, term, "", path):
            disagree.append(term)
    for term in (*PAIRED, *UNKNOWN):
        if not _laterality_errors(sc, term, None, path) or _laterality_errors(sc, term, "", path):
            disagree.append(term)
    assert disagree == []
