"""Lesion masks over DICOM (issue 15), against real peers: dcmtk storescu -> node -> Orthanc.

A lesion SEG is built here with highdicom from the photo (a rectangle); the node joins it with the
photo's parsing whichever arrives first and sends a TID 1500 SR to Orthanc. Checked: the SR is
dciodvfy-clean, references the photo, our body-part SEG and the lesion SEG, and its lesion area per
region equals rectangle ∩ that region's segment of our SEG (read back from Orthanc with highdicom).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, SegmentationStorage, generate_uid

from dicom_node.encode.validate import run_dciodvfy
from dicom_node.queue.job import JobKind, JobState
from tests.node_fixtures import (
    NODE_AET,
    PACS_AET,
    SCU_AET,
    SECRET_PATIENT,
    Orthanc,
    assert_no_patient_data,
    node_config,
    read,
    storescu,
    uids_in,
    wait_until,
    write_photos,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb, write_dataset

BUDGET_S = 60.0
ROWS, COLUMNS = 96, 128
LESION_BOX = (slice(20, 70), slice(30, 100))  # rows, columns of the test's lesion rectangle
LESION_AREA = "LESION-AREA"  # the SR's private code for the lesion area of a region


def lesion_seg(photo: Dataset, *, label: str = "Burn lesion", lesion: bool = True) -> Dataset:
    """A BINARY SEG of ``photo`` (the rectangle), as a viewer's segmentation tool makes one."""
    mask = np.zeros((ROWS, COLUMNS), dtype=bool)
    mask[LESION_BOX] = True
    if lesion:
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    else:
        category, kind = codes.SCT.AnatomicalStructure, codes.SCT.Skin
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[photo], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=50,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Viewer",
        manufacturer_model_name="Seg tool", software_versions="1", device_serial_number="1",
        series_description="Lesion outline" if lesion else "Skin")
    return seg


def send(datasets: list[Dataset], port: int, directory: Path, called_aet: str = NODE_AET) -> tuple[int, str]:
    """dcmtk storescu to the node (or Orthanc). ``-R``: propose only what the files need (storescu's
    default list of storage classes has no Segmentation Storage; a PACS proposes it)."""
    paths = [write_dataset(ds, directory / f"{ds.SOPInstanceUID}.dcm") for ds in datasets]
    done = subprocess.run(["storescu", "-R", "-aet", SCU_AET, "-aec", called_aet, "-to", "20", "-ta", "20",
                           "-td", "20", "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def instances(orthanc: Orthanc, photo: Dataset) -> dict[str, list[Dataset]]:
    """The study's objects in Orthanc (the photo excluded), by SOP class."""
    found: dict[str, list[Dataset]] = {}
    for item in orthanc.study_instances(photo.StudyInstanceUID):
        if item["MainDicomTags"]["SOPInstanceUID"] == photo.SOPInstanceUID:
            continue
        ds = read(orthanc.download(item["ID"]))
        found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def lesion_sr(orthanc: Orthanc, photo: Dataset) -> Dataset | None:
    for sr in instances(orthanc, photo).get(ComprehensiveSRStorage, []):
        if any(str(c.ConceptNameCodeSequence[0].CodeValue) == LESION_AREA for c in _items(sr)):
            return sr
    return None


def _items(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    for item in ds.get("ContentSequence", None) or []:
        out.append(item)
        out += _items(item)
    return out


def lesion_area_by_segment(sr: Dataset) -> dict[int, float]:
    """Each measurement group's lesion area NUM, keyed by the body-part SEG segment it references."""
    areas: dict[int, float] = {}
    for group in _items(sr):
        children = list(group.get("ContentSequence", None) or [])
        segment = [int(c.ReferencedSOPSequence[0].ReferencedSegmentNumber) for c in children
                   if c.ValueType == "IMAGE" and "ReferencedSegmentNumber" in c.ReferencedSOPSequence[0]]
        lesion = [float(c.MeasuredValueSequence[0].NumericValue) for c in children
                  if c.ValueType == "NUM" and str(c.ConceptNameCodeSequence[0].CodeValue) == LESION_AREA]
        if segment and lesion:
            areas[segment[0]] = lesion[0]
    return areas


def check_lesion_sr(orthanc: Orthanc, photo: Dataset, seg_sent: Dataset, tmp_path: Path) -> None:
    sr = wait_until(lambda: lesion_sr(orthanc, photo), BUDGET_S, f"the lesion SR of {photo.SOPInstanceUID}")
    body_segs = instances(orthanc, photo)[SegmentationStorage]
    assert len(body_segs) == 1, "our body-part SEG, once"
    body = hd.seg.Segmentation.from_dataset(body_segs[0])
    refs = uids_in(sr)
    assert {photo.SOPInstanceUID, body.SOPInstanceUID, seg_sent.SOPInstanceUID} <= refs, \
        "the SR references the photo, our SEG and the lesion SEG"
    assert sr.StudyInstanceUID == photo.StudyInstanceUID
    path = tmp_path / f"lesion-sr-{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert run_dciodvfy(path) == [], "dciodvfy on the lesion SR"

    # expected: rectangle ∩ each part-class segment of our SEG (persons have no lesion rows)
    rectangle = np.zeros((ROWS, COLUMNS), dtype=bool)
    rectangle[LESION_BOX] = True
    areas = lesion_area_by_segment(sr)
    part_numbers = [n for n in body.segment_numbers
                    if not str(body.get_segment_description(n).SegmentLabel).startswith("Person")]
    assert part_numbers, "the parsing found body parts (else nothing could be compared)"
    assert set(areas) == set(part_numbers), "one lesion area per body-part segment"
    pixels = body.get_pixels_by_source_instance([photo.SOPInstanceUID], segment_numbers=part_numbers)[0]
    for channel, number in enumerate(part_numbers):
        assert areas[number] == int(np.count_nonzero(pixels[..., channel] & rectangle)), f"segment {number}"
    assert sum(areas.values()) > 0, "the rectangle covers some body part"


def test_a_lesion_seg_after_or_before_its_photo_gives_the_lesion_sr(
        running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path) -> None:
    orthanc = running_orthanc
    node = node_factory(node_config(tmp_path / "data", small_model_dir, node_port, orthanc.dicom_port,
                                    worker={"runtime": "eager"}))
    node.start()
    first, second = (make_vl_photo(synthetic_rgb(ROWS, COLUMNS), **SECRET_PATIENT) for _ in range(2))

    # after: the photo (routed by Orthanc to the node) is parsed and its results are in Orthanc first
    assert storescu(write_photos([first], tmp_path / "in1"), orthanc.dicom_port, called_aet=PACS_AET).returncode == 0
    wait_until(lambda: len(instances(orthanc, first)) >= 3, BUDGET_S, "the first photo's results")
    seg_after = lesion_seg(first)
    code, text = send([seg_after], node.port, tmp_path / "seg1")
    assert code == 0, text

    # before: the SEG comes first and waits; the photo follows
    seg_before = lesion_seg(second)
    code, text = send([seg_before], node.port, tmp_path / "seg2")
    assert code == 0, text
    waiting = {j.sop_instance_uid: j for j in node.jobs()}[seg_before.SOPInstanceUID]
    assert waiting.kind == JobKind.LESION and waiting.state == JobState.RECEIVED
    assert waiting.source_uid == second.SOPInstanceUID
    assert storescu(write_photos([second], tmp_path / "in2"), orthanc.dicom_port, called_aet=PACS_AET).returncode == 0

    check_lesion_sr(orthanc, first, seg_after, tmp_path)
    check_lesion_sr(orthanc, second, seg_before, tmp_path)
    jobs = node.wait_jobs_final(4, BUDGET_S)
    assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.state, j.reason) for j in jobs]
    lesion_jobs = [j for j in jobs if j.kind == JobKind.LESION]
    assert len(lesion_jobs) == 2 and all(j.destinations == ("pacs",) for j in lesion_jobs)

    # a SEG that is not a lesion mask: ignored by default (acknowledged, nothing kept)
    other = lesion_seg(first, label="Skin", lesion=False)
    code, text = send([other], node.port, tmp_path / "other")
    assert code == 0, text
    assert other.SOPInstanceUID not in {j.sop_instance_uid for j in node.jobs()}
    assert "event=intake.segmentation_ignored" in node.log_text()
    assert node.stop() == 0
    assert_no_patient_data(node.log_text())


def test_orthanc_forwards_a_lesion_seg_drawn_on_a_photo_and_nothing_else(
        running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path) -> None:
    """The shipped Orthanc rule (config/orthanc/route-photos.lua): a lesion painted on a photo and stored
    to Orthanc reaches the node and comes back as the lesion SR; a lesion-labelled SEG of a CT and a
    copy of the node's own SEG stored by another AE title (only the Manufacturer guard stops it) stay in
    Orthanc."""
    orthanc = running_orthanc
    node = node_factory(node_config(tmp_path / "data", small_model_dir, node_port, orthanc.dicom_port,
                                    worker={"runtime": "eager"}))
    node.start()
    photo = make_vl_photo(synthetic_rgb(ROWS, COLUMNS), **SECRET_PATIENT)
    assert storescu(write_photos([photo], tmp_path / "in"), orthanc.dicom_port, called_aet=PACS_AET).returncode == 0
    ours = wait_until(lambda: instances(orthanc, photo).get(SegmentationStorage), BUDGET_S, "our body-part SEG")[0]

    # lesion-labelled: the node would take it, were it forwarded (copied: highdicom shares the
    # source's data elements, so changing them in place would change that photo too)
    of_a_ct = copy.deepcopy(lesion_seg(make_vl_photo(synthetic_rgb(ROWS, COLUMNS), **SECRET_PATIENT)))
    for series in of_a_ct.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPClassUID = CTImageStorage
    own_copy = read(orthanc.download(orthanc.post("/tools/find", {
        "Level": "Instance", "Query": {"SOPInstanceUID": ours.SOPInstanceUID}})[0]))
    own_copy.SOPInstanceUID = own_copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    lesion = lesion_seg(photo)
    code, text = send([of_a_ct, own_copy], orthanc.dicom_port, tmp_path / "not-forwarded", called_aet=PACS_AET)
    assert code == 0, text
    code, text = send([lesion], orthanc.dicom_port, tmp_path / "forwarded", called_aet=PACS_AET)
    assert code == 0, text

    sr = wait_until(lambda: lesion_sr(orthanc, photo), BUDGET_S, "the lesion SR of the SEG stored to Orthanc")
    assert {photo.SOPInstanceUID, ours.SOPInstanceUID, lesion.SOPInstanceUID} <= uids_in(sr)
    jobs = node.wait_jobs_final(2, BUDGET_S)
    assert {j.kind for j in jobs} == {JobKind.PHOTO, JobKind.LESION}, [(j.id, j.kind, j.state) for j in jobs]

    def orthanc_jobs_done() -> bool:
        return all(orthanc.get(f"/jobs/{job}")["State"] in ("Success", "Failure") for job in orthanc.get("/jobs"))

    wait_until(orthanc_jobs_done, BUDGET_S, "Orthanc's forwarding jobs to end")
    log = node.log_text()
    assert of_a_ct.SOPInstanceUID not in log and own_copy.SOPInstanceUID not in log, "forwarded what it should not"
    assert node.stop() == 0
    assert_no_patient_data(node.log_text())


def test_a_lesion_seg_whose_photo_never_comes_fails_and_other_segs_are_refused(
        running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path) -> None:
    node = node_factory(node_config(
        tmp_path / "data", small_model_dir, node_port, running_orthanc.dicom_port,
        worker={"runtime": "eager", "sweep_interval_s": 0.5},
        lesion={"wait_for_photo_h": 0.0005, "other_segmentations": "refuse"}))
    node.start()
    never = make_vl_photo(synthetic_rgb(ROWS, COLUMNS), **SECRET_PATIENT)  # never sent
    orphan = lesion_seg(never)
    code, text = send([orphan], node.port, tmp_path / "orphan")
    assert code == 0, text

    def failed() -> object:
        job = {j.sop_instance_uid: j for j in node.jobs()}[orphan.SOPInstanceUID]
        return job if job.state == JobState.FAILED else None

    job = wait_until(failed, 30, "the orphan lesion SEG's job to fail")
    assert job.reason == f"no photo {never.SOPInstanceUID} arrived within 0.0005 h"
    assert "event=lesion.photo_never_came" in node.log_text()

    other = lesion_seg(never, label="Skin", lesion=False)
    code, text = send([other], node.port, tmp_path / "other")
    assert code != 0, "storescu exits non-zero on a refused C-STORE"
    assert other.SOPInstanceUID not in {j.sop_instance_uid for j in node.jobs()}
    refused = [line for line in node.log_text().splitlines()
               if "event=intake.refused" in line and f"sop={other.SOPInstanceUID}" in line]
    assert len(refused) == 1 and 'status="0xC000 (cannot understand)"' in refused[0], refused
    assert "SEG is not a lesion mask" in refused[0]
    assert node.stop() == 0
    assert_no_patient_data(node.log_text())


# --------------------------------------------------------------------------- one study, front and back

ANTERIOR_CODE, POSTERIOR_CODE = ("255549009", "Anterior"), ("255551008", "Posterior")  # SNOMED CT, CID 2
# The chart regions and the M2FP skin classes (segment labels of our SEG) that are their visible skin.
REGION_SKIN = {"head": ("Face", "Hair"), "trunk": ("Torso skin",), "left upper limb": ("Left arm",),
               "right upper limb": ("Right arm",), "left lower limb": ("Left leg",),
               "right lower limb": ("Right leg",)}


def view_code(code: tuple[str, str]) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "SCT", code[1]
    return [item]


def tbsa_rows(sr: Dataset) -> tuple[float, dict[str, dict[str, float]]]:
    """The SR's estimated %TBSA and its region rows ("trunk posterior" -> {code value: number})."""
    total: float | None = None
    rows: dict[str, dict[str, float]] = {}
    for group in _items(sr):
        children = list(group.get("ContentSequence", None) or [])
        name = [str(c.TextValue) for c in children if c.ValueType == "TEXT" and str(c.TextValue).startswith("%TBSA ")]
        numbers = {str(c.ConceptNameCodeSequence[0].CodeValue): float(c.MeasuredValueSequence[0].NumericValue)
                   for c in children if c.ValueType == "NUM"}
        if name:
            rows[name[0].removeprefix("%TBSA ")] = numbers
        elif "TBSA-PCT" in numbers:
            total = numbers["TBSA-PCT"]
    assert total is not None, "the SR has an estimated %TBSA"
    return total, rows


def lesion_srs(orthanc: Orthanc, photo: Dataset) -> dict[str, Dataset]:
    """The study's lesion SRs, keyed by the lesion SEG each was made for (in its references)."""
    out: dict[str, Dataset] = {}
    for sr in instances(orthanc, photo).get(ComprehensiveSRStorage, []):
        if any(str(c.ConceptNameCodeSequence[0].CodeValue) == LESION_AREA for c in _items(sr)):
            out[str(sr.SOPInstanceUID)] = sr
    return out


def test_front_and_back_photos_of_one_study_combine_into_one_estimate(
        running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path) -> None:
    """Issue 15: the lesion SR of a study's second lesion SEG carries one %TBSA estimate of both
    photos: the front photo's rows unchanged, the back photo's posterior rows (lesion shares checked
    against our body-part SEG of that photo, read back from Orthanc), their sum as the estimate."""
    orthanc = running_orthanc
    node = node_factory(node_config(tmp_path / "data", small_model_dir, node_port, orthanc.dicom_port,
                                    worker={"runtime": "eager"}))
    node.start()
    study = generate_uid()
    front = make_vl_photo(synthetic_rgb(ROWS, COLUMNS), StudyInstanceUID=study,
                          ViewCodeSequence=view_code(ANTERIOR_CODE), **SECRET_PATIENT)
    back = make_vl_photo(synthetic_rgb(ROWS, COLUMNS), StudyInstanceUID=study,
                         ViewCodeSequence=view_code(POSTERIOR_CODE), **SECRET_PATIENT)
    assert storescu(write_photos([front, back], tmp_path / "in"), orthanc.dicom_port,
                    called_aet=PACS_AET).returncode == 0
    wait_until(lambda: len(instances(orthanc, front).get(SegmentationStorage, [])) == 2, BUDGET_S,
               "both photos' body-part SEGs")

    seg_front, seg_back = lesion_seg(front), lesion_seg(back)
    assert send([seg_front], node.port, tmp_path / "seg1")[0] == 0
    sr_front = wait_until(lambda: [sr for sr in lesion_srs(orthanc, front).values()
                                   if seg_front.SOPInstanceUID in uids_in(sr)], BUDGET_S, "the front lesion SR")[0]
    assert send([seg_back], node.port, tmp_path / "seg2")[0] == 0
    sr_both = wait_until(lambda: [sr for sr in lesion_srs(orthanc, front).values()
                                  if seg_back.SOPInstanceUID in uids_in(sr)], BUDGET_S, "the back lesion SR")[0]

    front_total, front_rows = tbsa_rows(sr_front)
    total, rows = tbsa_rows(sr_both)
    assert set(front_rows) == {f"{region} anterior" for region in REGION_SKIN}, "the front SR: one side"
    assert set(rows) == {f"{region} {side}" for region in REGION_SKIN for side in ("anterior", "posterior")}
    for name, numbers in front_rows.items():
        assert rows[name] == numbers, f"{name}: the front photo's row is the same in the study's estimate"
    posterior = {name: numbers for name, numbers in rows.items() if name.endswith("posterior")}
    assert total == pytest.approx(front_total + sum(n["TBSA-CONTRIB"] for n in posterior.values()), abs=1e-6)
    assert total == pytest.approx(sum(n["TBSA-CONTRIB"] for n in rows.values()), abs=1e-6)

    # the back photo's lesion shares, from our SEG of it as Orthanc holds it and the test's rectangle
    body = next(hd.seg.Segmentation.from_dataset(s) for s in instances(orthanc, front)[SegmentationStorage]
                if back.SOPInstanceUID in uids_in(s))
    labels = {str(body.get_segment_description(n).SegmentLabel): n for n in body.segment_numbers}
    rectangle = np.zeros((ROWS, COLUMNS), dtype=bool)
    rectangle[LESION_BOX] = True
    for region, classes in REGION_SKIN.items():
        numbers = [labels[c] for c in classes if c in labels]
        skin = np.zeros((ROWS, COLUMNS), dtype=bool)
        if numbers:
            pixels = body.get_pixels_by_source_instance([back.SOPInstanceUID], segment_numbers=numbers)[0]
            skin = np.any(pixels.astype(bool), axis=-1)
        share = posterior[f"{region} posterior"].get("TBSA-LES-SHARE")
        if skin.any():
            assert share == pytest.approx(np.count_nonzero(skin & rectangle) / np.count_nonzero(skin), abs=1e-6), region
        else:
            assert share is None, f"{region}: no visible skin, no lesion share"

    assert {front.SOPInstanceUID, back.SOPInstanceUID, seg_front.SOPInstanceUID,
            seg_back.SOPInstanceUID} <= uids_in(sr_both), "the study's estimate names both photos and both SEGs"
    path = tmp_path / "study-sr.dcm"
    sr_both.save_as(path, enforce_file_format=True)
    assert run_dciodvfy(path) == [], "dciodvfy on the study's lesion SR"
    assert node.stop() == 0
    assert_no_patient_data(node.log_text())
