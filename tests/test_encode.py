"""SEG, SC and SR built from a parsed photo: valid (dciodvfy), readable back, and true to the parsing."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.sr import _concepts_dict
from pydicom.uid import JPEGBaseline8Bit

from dicom_node.decode.photo import photo_from_dataset
from dicom_node.encode import codes as codetable
from dicom_node.encode.common import lossy_compression_history
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import EncodedResults, encode_results
from dicom_node.encode.sc import build_overlay_sc
from dicom_node.encode.seg import _BinarySegmentation, build_segmentation, plan_segments, segment_description
from dicom_node.encode.sr import build_measurement_report
from dicom_node.encode.validate import dciodvfy_available, validate
from dicom_node.parse.classes import CLASS_NAMES, HUMAN, class_color
from dicom_node.parse.render import overlay
from dicom_node.parse.result import ParsingResult, result_from_label_map
from dicom_node.parse.statistics import region_statistics
from tests.photo_factory import (
    make_grey_photo,
    make_jpeg_photo_with_img2dcm,
    make_vl_photo,
    synthetic_rgb,
    write_dataset,
)

H, W = 96, 144
needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")

# Warnings dciodvfy gives for every object using our private coding scheme (declared, but not
# in its registry); anything else is reported by the test that meets it.
EXPECTED_WARNING = "Unrecognized defined term <99M2FP> for value 1 of attribute <Coding Scheme Designator>"


# --------------------------------------------------------------------------------- fixtures


def synthetic_parsing(h: int = H, w: int = W, persons: int = 2) -> ParsingResult:
    """A label map of a standing figure (hat, hair, face, clothes, arms, legs, shoes) and persons."""
    lm = np.zeros((h, w), dtype=np.uint8)
    cx = w // 2
    lm[4:10, cx - 8:cx + 8] = 1  # Hat
    lm[10:16, cx - 10:cx + 10] = 2  # Hair
    lm[16:28, cx - 8:cx + 8] = 13  # Face
    lm[28:32, cx - 6:cx + 6] = 10  # Torso-skin (neck)
    lm[32:56, cx - 14:cx + 14] = 5  # UpperClothes
    lm[32:56, cx - 22:cx - 14] = 15  # Right-arm: on the image's left (subject faces the camera)
    lm[32:56, cx + 14:cx + 22] = 14  # Left-arm
    lm[56:84, cx - 12:cx] = 17  # Right-leg
    lm[56:84, cx:cx + 12] = 16  # Left-leg
    lm[84:90, cx - 12:cx] = 19  # Right-shoe
    lm[84:90, cx:cx + 12] = 18  # Left-shoe
    masks = []
    if persons >= 1:
        whole = np.zeros((h, w), dtype=bool)
        whole[3:91, cx - 23:cx + 23] = True
        masks.append(whole)
    if persons >= 2:  # a second, partly overlapping person at the edge
        second = np.zeros((h, w), dtype=bool)
        second[40:90, cx + 18:cx + 50] = True
        masks.append(second)
    return result_from_label_map(lm, masks, model_digest="sha256:" + "ab" * 32)


def lesion_mask(h: int = H, w: int = W) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[36:50, w // 2 + 10:w // 2 + 22] = True  # part clothes, part left arm
    return mask


@dataclasses.dataclass
class PhotoCase:
    name: str
    dataset: pydicom.Dataset
    rgb: np.ndarray


def _photo_case(kind: str, tmp_path: Path) -> PhotoCase:
    rgb = synthetic_rgb(H, W)
    if kind == "rgb":
        ds = make_vl_photo(rgb)
    elif kind == "jpeg":
        ds = pydicom.dcmread(make_jpeg_photo_with_img2dcm(rgb, tmp_path))
    elif kind == "mono2":
        ds = make_grey_photo(rgb.mean(axis=2).astype(np.uint8))
    else:
        raise ValueError(kind)
    photo = photo_from_dataset(ds)
    return PhotoCase(kind, ds, photo.rgb)


@pytest.fixture(params=["rgb", "jpeg", "mono2"])
def photo(request, tmp_path) -> PhotoCase:
    return _photo_case(request.param, tmp_path)


@pytest.fixture
def rgb_photo(tmp_path) -> PhotoCase:
    return _photo_case("rgb", tmp_path)


FIXED_TIME = datetime.datetime(2024, 6, 11, 14, 30, 5, 123456)


def encode(case: PhotoCase, result: ParsingResult | None = None, **options) -> EncodedResults:
    result = result or synthetic_parsing()
    opts = EncodeOptions(content_datetime=FIXED_TIME, **options)
    return encode_results(case.dataset, case.rgb, result, overlay(case.rgb, result.label_map), opts,
                          lesion_mask=lesion_mask())


def write_all(encoded: EncodedResults, tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, ds in (("seg", encoded.seg), ("sc", encoded.sc), ("sr", encoded.sr)):
        if ds is not None:
            paths[name] = write_dataset(ds, tmp_path / f"{name}.dcm")
    return paths


def assert_dciodvfy_clean(path: Path, photo: PhotoCase | None = None) -> list[str]:
    """No Error line; no Warning line but the private-scheme one and those the photo has itself."""
    report = validate(path)
    assert report.errors == [], f"dciodvfy errors for {path.name}:\n" + "\n".join(report.errors)
    inherited = set(validate(photo.dataset).warnings) if photo is not None else set()
    unexpected = sorted({w for w in report.warnings if EXPECTED_WARNING not in w} - inherited)
    assert unexpected == [], f"unexpected dciodvfy warnings for {path.name}: {unexpected}"
    return report.warnings


# --------------------------------------------------------------------------------- code table


def _sct_meaning(code_value: str) -> set[str]:
    return {
        meaning
        for entries in _concepts_dict.concepts["SCT"].values()
        for value, (meaning, _cids) in entries.items()
        if value == code_value
    }


def test_code_table_covers_every_class_with_checked_codes():
    for class_index in range(1, len(CLASS_NAMES)):
        coding = codetable.class_coding(class_index)
        for code in (coding.category, coding.property_type, *coding.modifiers):
            if code.scheme_designator == "SCT":
                # every SNOMED CT code we use is one pydicom knows, with the same meaning
                assert code.meaning in _sct_meaning(code.value), code
            else:
                assert code.scheme_designator == codetable.PRIVATE_SCHEME
                assert code.value == str(class_index)  # private class codes: value = class index
    assert codetable.class_coding(HUMAN).property_type.value == "38266002"  # Entire body
    with pytest.raises(ValueError, match="class index 0"):
        codetable.class_coding(0)


@pytest.mark.parametrize(
    ("class_index", "type_value", "laterality"),
    [(14, "53120007", "7771000"), (15, "53120007", "24028007"), (16, "61685007", "7771000"),
     (17, "61685007", "24028007"), (13, "89545001", None), (2, "386045008", None)],
)
def test_laterality_is_a_modifier_on_a_shared_type(class_index, type_value, laterality):
    coding = codetable.class_coding(class_index)
    assert coding.property_type.value == type_value
    assert (coding.laterality.value if coding.laterality else None) == laterality


def test_garments_are_clothing_named_by_a_private_modifier():
    coding = codetable.class_coding(5)  # UpperClothes
    assert coding.property_type.value == "272180002"  # Clothing
    assert coding.modifiers[0].scheme_designator == "99M2FP" and coding.modifiers[0].value == "5"
    assert coding.finding_type.meaning == "Upper clothes"


def test_private_code_value_fits_sh():
    with pytest.raises(ValueError, match="16 characters"):
        codetable.private_code("X" * 17, "too long")


# --------------------------------------------------------------------------------- all three, valid


@needs_dciodvfy
def test_all_three_objects_pass_dciodvfy(photo, tmp_path):
    encoded = encode(photo)
    paths = write_all(encoded, tmp_path)
    assert set(paths) == {"seg", "sc", "sr"}
    for path in paths.values():
        assert_dciodvfy_clean(path, photo)


@needs_dciodvfy
def test_photo_without_body_part_gives_valid_objects(rgb_photo, tmp_path):
    """General Series Laterality is Type 2C (paired body part): unknown without Body Part Examined."""
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in rgb_photo.dataset:
            del rgb_photo.dataset[keyword]
    paths = write_all(encode(rgb_photo), tmp_path)
    for name, path in paths.items():
        report = validate(path)
        assert report.errors == [], f"dciodvfy errors for {name}:\n" + "\n".join(report.errors)
        # dciodvfy's reminder that an empty Laterality means "unknown", which is the truth here
        unknown = "only permitted to be empty when actually unknown"
        unexpected = [w for w in report.warnings if EXPECTED_WARNING not in w and unknown not in w]
        assert unexpected == [], f"unexpected dciodvfy warnings for {name}: {unexpected}"
    sc = pydicom.dcmread(paths["sc"])
    assert "Laterality" in sc and not sc.Laterality


def test_objects_reference_the_photo_and_share_its_study_and_patient(photo, tmp_path):
    encoded = encode(photo)
    paths = write_all(encoded, tmp_path)
    src = photo.dataset
    seg, sc, sr = (pydicom.dcmread(paths[n]) for n in ("seg", "sc", "sr"))
    uids = set()
    for ds in (seg, sc, sr):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID
        assert ds.PatientName == src.PatientName
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.SOPInstanceUID != src.SOPInstanceUID
        uids |= {ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert len(uids) == 6  # three new series, three new instances

    photo_uid = src.SOPInstanceUID
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == photo_uid
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == photo_uid
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == photo_uid
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == photo_uid
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {photo_uid, seg.SOPInstanceUID}
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns)
    assert seg.BodyPartExamined == sc.BodyPartExamined == src.BodyPartExamined


# --------------------------------------------------------------------------------- SEG


def test_seg_reads_back_with_one_mask_per_class_and_person(rgb_photo, tmp_path):
    result = synthetic_parsing()
    encoded = encode(rgb_photo, result)
    path = write_all(encoded, tmp_path)["seg"]
    seg = hd.seg.segread(path)

    classes = result.classes_present()
    assert seg.SegmentationType == "BINARY"
    assert seg.SegmentsOverlap == "YES"  # persons overlap their parts
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert seg.get_segment_numbers() == list(range(1, len(classes) + len(result.persons) + 1))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[rgb_photo.dataset.SOPInstanceUID], combine_segments=False
    )[0]
    assert pixels.shape == (H, W, len(classes) + len(result.persons))
    for number, class_index in enumerate(classes, start=1):
        description = seg.get_segment_description(number)
        coding = codetable.class_coding(class_index)
        assert description.segment_label == coding.label
        assert description.segmented_property_type == coding.property_type
        assert description.tracking_id == coding.label
        np.testing.assert_array_equal(pixels[:, :, number - 1].astype(bool), result.label_map == class_index)
    for person in result.persons:
        number = len(classes) + person.index + 1
        description = seg.get_segment_description(number)
        assert description.segmented_property_type == codetable.ENTIRE_BODY
        assert description.tracking_id == f"Person {person.index + 1}"
        assert description.tracking_uid
        np.testing.assert_array_equal(pixels[:, :, number - 1].astype(bool), person.mask)


def test_seg_laterality_modifier_and_display_colour(rgb_photo, tmp_path):
    seg = pydicom.dcmread(write_all(encode(rgb_photo), tmp_path)["seg"])
    by_label = {item.SegmentLabel: item for item in seg.SegmentSequence}
    left_arm = by_label["Left arm"].SegmentedPropertyTypeCodeSequence[0]
    assert left_arm.CodeValue == "53120007"
    assert left_arm.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    right_leg = by_label["Right leg"].SegmentedPropertyTypeCodeSequence[0]
    assert right_leg.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    face = by_label["Face"].SegmentedPropertyTypeCodeSequence[0]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in face

    names = {codetable.class_coding(c).label: c for c in range(1, len(CLASS_NAMES))}
    for item in seg.SegmentSequence:
        class_index = HUMAN if item.SegmentLabel.startswith("Person") else names[item.SegmentLabel]
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.array(rgb) - np.array(class_color(class_index))).max() <= 1, item.SegmentLabel

    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "M2FP"
    digest = "sha256:" + "ab" * 32
    assert algorithm.AlgorithmVersion == digest[:64]  # cut to 64 characters (LO) ...
    assert f"digest={digest}" in algorithm.AlgorithmParameters  # ... and given whole here
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99M2FP"
    assert "FrameOfReferenceUID" not in seg
    assert seg.PatientOrientation == ""


@needs_dciodvfy
def test_seg_without_person_segments(rgb_photo, tmp_path):
    encoded = encode(rgb_photo, include_person_segments=False)
    paths = write_all(encoded, tmp_path)
    seg = hd.seg.segread(paths["seg"])
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    assert not any(label.startswith("Person") for label in labels)
    assert seg.number_of_segments == len(synthetic_parsing().classes_present())
    # persons are still measured, on the photo (TID 1501) instead of on a segment
    report = hd.sr.srread(paths["sr"]).content
    person_groups = [
        g for g in report.get_image_measurement_groups() if g.tracking_identifier.startswith("Person ")
    ]
    assert len(person_groups) == 2
    for path in paths.values():
        assert_dciodvfy_clean(path)


@pytest.mark.parametrize(("persons", "expected"), [(0, "NO"), (1, "YES"), (2, "YES"), ("apart", "NO")])
def test_fast_overlap_check_agrees_with_highdicom(persons, expected):
    if persons == "apart":  # one person that covers no labelled pixel
        lm = np.zeros((H, W), np.uint8)
        lm[:, : W // 2] = 13
        mask = np.zeros((H, W), bool)
        mask[:, W // 2:] = True
        result = result_from_label_map(lm, [mask])
    else:
        result = synthetic_parsing(persons=persons)
    planned = plan_segments(result)
    masks = np.stack([s.mask(result) for s in planned], axis=-1)[np.newaxis]
    numbers = np.arange(1, len(planned) + 1)
    binary = hd.seg.SegmentationTypeValues.BINARY
    _, stock = hd.seg.Segmentation._check_and_cast_pixel_array(masks, numbers, binary, np.uint8)
    _, fast = _BinarySegmentation._check_and_cast_pixel_array(masks, numbers, binary, np.uint8)
    assert fast == stock == hd.seg.SegmentsOverlapValues(expected)


def test_seg_rejects_a_parsing_of_another_size(rgb_photo):
    with pytest.raises(ValueError, match="pixel for pixel"):
        build_segmentation(rgb_photo.dataset, synthetic_parsing(H + 2, W))
    result = synthetic_parsing(persons=1)
    wrong = dataclasses.replace(result.persons[0], mask=np.ones((H, W + 1), bool))
    with pytest.raises(ValueError, match="person 1's mask"):
        build_segmentation(rgb_photo.dataset, dataclasses.replace(result, persons=[wrong]))


def test_nothing_found_gives_no_seg_but_sc_and_sr(rgb_photo, tmp_path):
    empty = result_from_label_map(np.zeros((H, W), np.uint8), [])
    with pytest.raises(ValueError, match="at least one segment"):
        build_segmentation(rgb_photo.dataset, empty)
    encoded = encode(rgb_photo, empty)
    assert encoded.seg is None
    paths = write_all(encoded, tmp_path)
    report = hd.sr.srread(paths["sr"]).content
    (image_group,) = report.get_image_measurement_groups()
    count = image_group.get_measurements(name=codetable.PERSON_COUNT)[0]
    assert count.value == 0
    if dciodvfy_available():
        for path in paths.values():
            assert_dciodvfy_clean(path)


# --------------------------------------------------------------------------------- SC


def test_sc_is_a_derived_burned_in_overlay(rgb_photo, tmp_path):
    result = synthetic_parsing()
    image = overlay(rgb_photo.rgb, result.label_map)
    sc = pydicom.dcmread(write_all(encode(rgb_photo, result), tmp_path)["sc"])
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert "not for diagnosis" in sc.SeriesDescription
    assert "Not for diagnostic use" in sc.ImageComments
    assert sc.LossyImageCompression == "00"
    np.testing.assert_array_equal(sc.pixel_array, image)


@needs_dciodvfy
def test_sc_jpeg_records_its_own_lossy_step(rgb_photo, tmp_path):
    encoded = encode(rgb_photo, sc_jpeg=True)
    path = write_all(encoded, tmp_path)["sc"]
    assert_dciodvfy_clean(path)
    sc = pydicom.dcmread(path)
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert sc.PhotometricInterpretation == "YBR_FULL_422"
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(sc.LossyImageCompressionRatio) > 1.0
    decoded = photo_from_dataset(sc).rgb
    expected = overlay(rgb_photo.rgb, synthetic_parsing().label_map)
    assert np.abs(decoded.astype(int) - expected).mean() < 6


def test_lossy_photo_makes_lossy_results(tmp_path):
    case = _photo_case("jpeg", tmp_path)
    assert lossy_compression_history(case.dataset) is not None
    encoded = encode(case)
    assert encoded.sc.LossyImageCompression == "01"
    assert "ISO_10918_1" in list(np.atleast_1d(encoded.sc.LossyImageCompressionMethod))
    assert encoded.seg.LossyImageCompression == "01"

    jpeg_sc = encode(case, sc_jpeg=True).sc
    methods = list(jpeg_sc.LossyImageCompressionMethod)
    assert methods[-1] == "ISO_10918_1" and len(methods) == 2  # the photo's step, then ours


def test_sc_rejects_a_non_rgb_overlay(rgb_photo):
    with pytest.raises(ValueError, match="uint8"):
        build_overlay_sc(rgb_photo.dataset, rgb_photo.rgb.astype(np.float32), synthetic_parsing())


# --------------------------------------------------------------------------------- SR


def _expected_sr_figures(result: ParsingResult, lesion: np.ndarray) -> dict:
    """The SR's figures counted by definition from the parsing's arrays (plain numpy, no package code).

    Regions are the part classes 1..19 that own a label-map pixel. ``image`` percentages are over
    all photo pixels; ``persons`` percentages over the union of the person masks; the lesion
    percentage is over the region's own pixels.
    """
    label_map = np.asarray(result.label_map)
    masks = [np.asarray(p.mask, dtype=bool) for p in result.persons]
    union = np.logical_or.reduce(masks) if masks else np.zeros(label_map.shape, bool)
    all_pixels = label_map.shape[0] * label_map.shape[1]
    union_pixels = int(union.sum())
    regions = {}
    for c in range(1, len(CLASS_NAMES)):
        region = label_map == c
        pixels = int(region.sum())
        if pixels == 0:
            continue
        hit = int((region & lesion).sum())
        regions[c] = {
            "pixels": pixels,
            "percent_of_image": 100.0 * pixels / all_pixels,
            "percent_of_persons": 100.0 * int((region & union).sum()) / union_pixels,
            "lesion_pixels": hit,
            "lesion_percent": 100.0 * hit / pixels,
        }
    persons = [
        {"pixels": int(m.sum()), "percent_of_image": 100.0 * int(m.sum()) / all_pixels} for m in masks
    ]
    return {"person_count": len(masks), "person_pixels": union_pixels, "regions": regions, "persons": persons}


def test_sr_numbers_equal_the_statistics(rgb_photo, tmp_path):
    result = synthetic_parsing()
    expected = _expected_sr_figures(result, lesion_mask())
    # hand counts of synthetic_parsing's rectangles, so the numpy definitions above are checked too:
    # persons 88x46 and 50x32 overlapping on 50x5 pixels; the face 12x16; the lesion 14x4 on the
    # upper clothes and 14x8 on the left arm
    assert expected["person_pixels"] == 88 * 46 + 50 * 32 - 50 * 5
    assert expected["regions"][13]["pixels"] == 12 * 16
    assert expected["regions"][5]["lesion_pixels"] == 14 * 4
    assert expected["regions"][14]["lesion_pixels"] == 14 * 8
    encoded = encode(rgb_photo, result)
    paths = write_all(encoded, tmp_path)
    sr = hd.sr.srread(paths["sr"])
    seg = pydicom.dcmread(paths["seg"])
    report = sr.content
    assert isinstance(sr, hd.sr.ComprehensiveSR)

    (image_group,) = [
        g for g in report.get_image_measurement_groups() if g.tracking_identifier == "Persons in image"
    ]
    values = {m.name.value: m.value for m in image_group.get_measurements()}
    assert values[codetable.PERSON_COUNT.value] == expected["person_count"] == 2
    assert values[codetable.AREA.value] == expected["person_pixels"]

    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    seg_uids = {item.TrackingID: item.TrackingUID for item in seg.SegmentSequence}
    seg_numbers = {item.TrackingID: item.SegmentNumber for item in seg.SegmentSequence}
    assert len(groups) == len(expected["regions"]) + len(expected["persons"])
    for class_index, region in expected["regions"].items():
        label = codetable.class_coding(class_index).label
        group = groups[label]
        assert group.tracking_uid == seg_uids[label]  # same region in SEG and SR (TID 4108)
        reference = group.referenced_segment
        assert reference[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == seg_numbers[label]
        source = reference[1].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == rgb_photo.dataset.SOPInstanceUID
        values = {m.name.value: m for m in group.get_measurements()}
        assert values[codetable.AREA.value].value == region["pixels"]
        assert values[codetable.AREA.value].unit.value == "{pixels}"
        of_image = values[codetable.AREA_PERCENT_OF_IMAGE.value]
        of_persons = values[codetable.AREA_PERCENT_OF_PERSONS.value]
        assert of_image.value == pytest.approx(region["percent_of_image"])
        assert of_persons.value == pytest.approx(region["percent_of_persons"])
        assert of_image.unit.value == of_persons.unit.value == "%"
        assert values[codetable.LESION_AREA.value].value == region["lesion_pixels"]
        assert values[codetable.LESION_PERCENT_OF_REGION.value].value == pytest.approx(region["lesion_percent"])
    for index, person in enumerate(expected["persons"]):
        group = groups[f"Person {index + 1}"]
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values[codetable.AREA.value] == person["pixels"]
        assert values[codetable.AREA_PERCENT_OF_IMAGE.value] == pytest.approx(person["percent_of_image"])
    assert any(region["lesion_pixels"] > 0 for region in expected["regions"].values())


def test_sr_observer_is_the_node_and_groups_name_the_algorithm(rgb_photo, tmp_path):
    sr = pydicom.dcmread(write_all(encode(rgb_photo), tmp_path)["sr"])
    root = sr.ContentSequence
    observer_type = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121005")
    assert observer_type.ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99M2FP"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
    report = hd.sr.ComprehensiveSR.from_dataset(sr).content
    for group in report.get_volumetric_roi_measurement_groups():
        names = [item.ConceptNameCodeSequence[0].CodeValue for item in group[0].ContentSequence]
        assert "111001" in names  # Algorithm Name (TID 4019)
    left_arm = report.get_volumetric_roi_measurement_groups(finding_type=codetable.UPPER_LIMB)
    lateralities = {
        site.laterality.value for group in left_arm for site in group.finding_sites if site.laterality
    }
    assert lateralities == {"7771000", "24028007"}


def test_sr_refuses_a_seg_built_with_other_options(rgb_photo):
    result = synthetic_parsing()
    seg = build_segmentation(rgb_photo.dataset, result, EncodeOptions(include_person_segments=False))
    with pytest.raises(ValueError, match="not built from this parsing"):
        build_measurement_report(rgb_photo.dataset, seg, result, region_statistics(result), EncodeOptions())


# --------------------------------------------------------------------------------- behaviour


def _content_without_uids_and_times(ds: pydicom.Dataset) -> dict:
    def strip(node):
        if isinstance(node, dict):
            if node.get("vr") in {"UI", "DA", "TM", "DT"}:
                return None
            return {k: strip(v) for k, v in node.items() if k not in ("InlineBinary", "BulkDataURI")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(ds.to_json_dict())


def test_identical_input_gives_identical_content_except_uids_and_times(rgb_photo):
    first, second = encode(rgb_photo), encode(rgb_photo)
    for a, b in zip(first.datasets(), second.datasets(), strict=True):
        assert a.SOPInstanceUID != b.SOPInstanceUID
        assert _content_without_uids_and_times(a) == _content_without_uids_and_times(b)
        assert a.PixelData == b.PixelData if "PixelData" in a else True


def test_patient_data_is_passed_on_unchanged(tmp_path):
    rgb = synthetic_rgb(H, W)
    ds = make_vl_photo(rgb, PatientName="Müller^Jürgen", PatientSex="U", PatientAge="042Y",
                       IssuerOfPatientID="HOSP", OtherPatientIDsSequence=None)
    case = PhotoCase("latin1", ds, rgb)
    paths = write_all(encode(case), tmp_path)
    for path in paths.values():
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == "ISO_IR 100"
        assert str(back.PatientName) == "Müller^Jürgen"
        assert back.PatientAge == "042Y" and back.IssuerOfPatientID == "HOSP"
        assert back.PatientSex == "U"  # not ours to correct, even if highdicom would refuse it
    assert ds.PatientSex == "U"  # the received photo is not modified


@needs_dciodvfy
def test_photo_without_type2_patient_and_study_attributes(tmp_path):
    """A non-conformant gateway may drop Type 2 attributes: results still build and validate."""
    rgb = synthetic_rgb(H, W)
    ds = make_vl_photo(rgb, PatientBirthDate=None, PatientSex=None, StudyDate=None, StudyTime=None,
                       StudyID=None, AccessionNumber=None, ReferringPhysicianName=None)
    paths = write_all(encode(PhotoCase("bare", ds, rgb)), tmp_path)
    for path in paths.values():
        back = pydicom.dcmread(path)
        assert back.PatientBirthDate == "" and back.StudyDate == "" and back.AccessionNumber == ""
        assert validate(path).errors == []


def _highdicom_standard_tables():
    """highdicom's lazily read tables of the standard (JSON files of 0.3 MB to 22 MB, each cached
    by ``functools.lru_cache``): the cost that ``warm_up`` exists to pay before the first photo."""
    from highdicom import _standard_utils

    return {
        "sop_class_iod_map": _standard_utils.get_sop_class_iod_map,
        "iod_module_map": _standard_utils.get_iod_module_map,
        "module_attribute_map": _standard_utils.get_module_attribute_map,
    }


def test_warm_up_loads_the_tables_a_photo_needs(rgb_photo):
    from dicom_node.encode.results import warm_up

    tables = _highdicom_standard_tables()
    for table in tables.values():
        table.cache_clear()  # as in a fresh process: nothing read yet
    assert {name: t.cache_info().currsize for name, t in tables.items()} == dict.fromkeys(tables, 0)

    warm_up()
    assert {name: t.cache_info().currsize for name, t in tables.items()} == dict.fromkeys(tables, 1)

    # and they are the tables a real photo's SEG, SC and SR need: building them reads none again
    before = {name: t.cache_info() for name, t in tables.items()}
    encoded = encode(rgb_photo)
    assert encoded.seg is not None and encoded.sc is not None and encoded.sr is not None
    after = {name: t.cache_info() for name, t in tables.items()}
    assert {name: info.misses for name, info in after.items()} == {n: i.misses for n, i in before.items()}
    assert all(after[name].hits > before[name].hits for name in tables), after  # consulted, from memory


def test_options_are_checked_up_front():
    with pytest.raises(ValueError, match="seg_series_number"):
        EncodeOptions(seg_series_number=0)
    with pytest.raises(ValueError, match="sc_series_description"):
        EncodeOptions(sc_series_description="x" * 65)


def test_plan_segments_numbers_without_gaps():
    result = synthetic_parsing()
    planned = plan_segments(result)
    assert [s.segment_number for s in planned] == list(range(1, len(planned) + 1))
    assert [s.class_index for s in planned if not s.is_person] == result.classes_present()
    assert [s.person_index for s in planned if s.is_person] == [0, 1]


@pytest.mark.parametrize("size", [(64, 48), (37, 29)])  # 29 x 37 pixels is not a multiple of 8
def test_fast_bit_packing_matches_pydicom(size, rgb_photo):
    from pydicom.pixels.utils import pack_bits

    rng = np.random.default_rng(size[0])
    planes = rng.random((3, *size)) < 0.4
    seg = build_segmentation(rgb_photo.dataset, synthetic_parsing())
    assert isinstance(seg, _BinarySegmentation) and seg.BitsAllocated == 1
    for array in (planes.ravel(), planes.ravel().astype(np.uint8)):
        assert seg._encode_pixels_native(array) == pack_bits(array, pad=False)
    with pytest.raises(ValueError, match="binary"):
        seg._encode_pixels_native(np.full(64, 2, np.uint8))


def test_seg_pixel_data_equals_stock_highdicom(rgb_photo):
    """The whole SEG, frames and bits, as highdicom itself would encode it."""
    result = synthetic_parsing(persons=2)
    ours = build_segmentation(rgb_photo.dataset, result)
    planned = plan_segments(result)
    stack = np.stack([s.mask(result) for s in planned], axis=-1)[np.newaxis].astype(np.uint8)
    stock = hd.seg.Segmentation(
        source_images=[rgb_photo.dataset], pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(s, result) for s in planned],
        series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="x", manufacturer_model_name="x", software_versions="x", device_serial_number="x",
        omit_empty_frames=False)
    assert ours.NumberOfFrames == stock.NumberOfFrames
    assert ours.PixelData == stock.PixelData


# --------------------------------------------------------------------------------- what viewers draw


def _shared_geometry(seg: pydicom.Dataset) -> tuple[list[float], float, float, list[float]]:
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    return ([float(v) for v in measures.PixelSpacing], float(measures.SliceThickness),
            float(measures.SpacingBetweenSlices), [float(v) for v in orientation])


def _assert_same_segments(path: Path, photo: PhotoCase, result: ParsingResult) -> None:
    """highdicom reads the SEG back with one segment per class, then per person, and their masks."""
    seg = hd.seg.segread(path)
    planned = plan_segments(result)
    assert seg.get_segment_numbers() == [s.segment_number for s in planned]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[photo.dataset.SOPInstanceUID], combine_segments=False
    )[0]
    for segment in planned:
        assert seg.get_segment_description(segment.segment_number).tracking_id == segment.tracking_id
        np.testing.assert_array_equal(pixels[:, :, segment.segment_number - 1].astype(bool), segment.mask(result))


@needs_dciodvfy
def test_seg_shares_default_pixel_measures_and_plane_orientation(photo, tmp_path):
    """No Pixel Spacing on the photo: 1\\1 mm (documented, not a calibration), orientation 1\\0\\0\\0\\1\\0."""
    assert "PixelSpacing" not in photo.dataset
    result = synthetic_parsing()
    path = write_all(encode(photo, result), tmp_path)["seg"]
    seg = pydicom.dcmread(path)
    assert _shared_geometry(seg) == ([1.0, 1.0], 1.0, 1.0, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert "FrameOfReferenceUID" not in seg  # the photo has none: alignment is by the source image
    assert "PerFrameFunctionalGroupsSequence" in seg
    assert all("PlanePositionSequence" not in item for item in seg.PerFrameFunctionalGroupsSequence)
    assert_dciodvfy_clean(path, photo)
    _assert_same_segments(path, photo, result)


@needs_dciodvfy
def test_seg_pixel_measures_come_from_the_photos_pixel_spacing(tmp_path):
    case = _photo_case("rgb", tmp_path)
    case.dataset.PixelSpacing = [0.2, 0.25]  # row spacing \ column spacing, mm
    result = synthetic_parsing()
    path = write_all(encode(case, result), tmp_path)["seg"]
    assert _shared_geometry(pydicom.dcmread(path)) == ([0.2, 0.25], 1.0, 1.0, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert_dciodvfy_clean(path, case)
    _assert_same_segments(path, case, result)


@pytest.mark.parametrize("spacing", [[0.0, 0.5], [0.5, -1.0], [0.5], [0.1, 0.2, 0.3], b"ab\\cd "])
def test_seg_ignores_an_unusable_pixel_spacing(spacing, rgb_photo, caplog):
    """A photo's Pixel Spacing that is not two positive numbers: the default, a WARNING, no crash."""
    if isinstance(spacing, bytes):  # as read from a file: converted (and failing) only when used
        tag = pydicom.tag.Tag("PixelSpacing")
        rgb_photo.dataset._dict[tag] = RawDataElement(tag, "DS", len(spacing), spacing, 0, False, True)
    else:
        rgb_photo.dataset.PixelSpacing = spacing
    rgb_photo.dataset.PatientName = "Secret^Patient"
    with caplog.at_level("WARNING", logger="dicom_node.encode.seg"):
        seg = build_segmentation(rgb_photo.dataset, synthetic_parsing())
    assert _shared_geometry(seg)[0] == [1.0, 1.0]
    (line,) = [r.getMessage() for r in caplog.records if "event=encode.pixel_spacing_ignored" in r.getMessage()]
    assert f"sop_instance_uid={rgb_photo.dataset.SOPInstanceUID}" in line and "used=default" in line
    assert "Secret" not in caplog.text


LEFT_ARM = 14


def two_piece_parsing(h: int = 140, w: int = 180) -> tuple[ParsingResult, list[np.ndarray]]:
    """The left arm in two pieces (a disc, a notched ellipse) and a 3-pixel speck; one person."""
    rows, columns = np.mgrid[:h, :w]
    disc = (rows - 40) ** 2 + (columns - 50) ** 2 <= 22**2
    ellipse = ((rows - 100) / 16.0) ** 2 + ((columns - 120) / 40.0) ** 2 <= 1.0
    ellipse[94:104, 125:] = False  # a notch from the right: a concave piece, still one piece
    label_map = np.zeros((h, w), dtype=np.uint8)
    label_map[disc] = LEFT_ARM
    label_map[ellipse] = LEFT_ARM
    label_map[5, 5:8] = LEFT_ARM  # below the minimum piece area: no outline
    label_map[60:80, 60:90] = 13  # a face between them, so the image has another class
    person = np.zeros((h, w), dtype=bool)
    person[10:130, 20:170] = True
    return result_from_label_map(label_map, [person]), [disc, ellipse]


def _boundary_pixel_centres(mask: np.ndarray) -> np.ndarray:
    """Centres (column + 0.5, row + 0.5) of the pixels of mask's morphological gradient (3x3)."""
    padded = np.pad(mask, 1)
    shifts = [padded[1 + dr:padded.shape[0] - 1 + dr, 1 + dc:padded.shape[1] - 1 + dc]
              for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    gradient = np.logical_or.reduce(shifts) & ~np.logical_and.reduce(shifts)
    r, c = np.nonzero(gradient)
    return np.column_stack([c + 0.5, r + 0.5])


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def _outline_groups(sr: hd.sr.ComprehensiveSR, label: str) -> list:
    """A region's TID 1410 groups: its largest piece's (tracked as the region) first, then the others."""
    planar = sr.content.get_planar_roi_measurement_groups()
    largest = [g for g in planar if str(g.tracking_identifier) == label]
    others = [g for g in planar if str(g.tracking_identifier).startswith(f"{label} outline")]
    return largest + sorted(others, key=lambda g: str(g.tracking_identifier))


def _ohif_drawable(sr: pydicom.Dataset) -> dict[str, bool]:
    """Tracking UID -> whether OHIF 3.13's SR viewport can place that measurement on an image.

    OHIF merges the Measurement Groups (125007) of Imaging Measurements by Tracking UID; a merged
    measurement is drawn from a top-level SCOORD, or else from the SCOORDs its NUMs are INFERRED
    FROM; one with neither has no coordinates and leaves the whole SR viewport black.
    """
    (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    drawable: dict[str, bool] = {}
    for group in container.ContentSequence:
        if group.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        items = group.ContentSequence
        (uid,) = [i.UID for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112040"]
        top = any(i.ValueType == "SCOORD" for i in items)
        inferred = any(i.ValueType == "NUM" and any(c.ValueType == "SCOORD" and c.RelationshipType == "INFERRED FROM"
                                                    for c in i.get("ContentSequence", []))
                       for i in items)
        drawable[str(uid)] = drawable.get(str(uid), False) or top or inferred
    return drawable


@needs_dciodvfy
def test_sr_outlines_a_region_in_two_pieces(tmp_path):
    result, pieces = two_piece_parsing()
    case = PhotoCase("rgb", make_vl_photo(synthetic_rgb(*result.size_hw)), synthetic_rgb(*result.size_hw))
    encoded = encode_results(case.dataset, case.rgb, result, overlay(case.rgb, result.label_map),
                             EncodeOptions(content_datetime=FIXED_TIME))
    paths = write_all(encoded, tmp_path)
    assert_dciodvfy_clean(paths["sr"], case)
    sr = hd.sr.srread(paths["sr"])
    seg = pydicom.dcmread(paths["seg"])
    h, w = result.size_hw

    groups = _outline_groups(sr, "Left arm")
    assert [str(g.tracking_identifier) for g in groups] == ["Left arm", "Left arm outline 2 of 2"]
    region = result.label_map == LEFT_ARM
    boundary = _boundary_pixel_centres(region)
    expected_pixels = sorted((int(p.sum()) for p in pieces), reverse=True)  # largest piece first
    for group, pixels in zip(groups, expected_pixels, strict=True):
        scoord = group.roi
        assert scoord.GraphicType == "POLYLINE" and scoord.RelationshipType == "CONTAINS"
        assert scoord.ConceptNameCodeSequence[0].CodeValue == "111030"  # Image Region (TID 1410)
        (source,) = scoord.ContentSequence
        assert source.RelationshipType == "SELECTED FROM"
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == case.dataset.SOPInstanceUID
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)  # column\row pairs
        np.testing.assert_array_equal(points[0], points[-1])  # closed (C.18.6.1.2)
        assert len(points) >= 4
        assert points[:, 0].min() >= 0 and points[:, 0].max() <= w
        assert points[:, 1].min() >= 0 and points[:, 1].max() <= h
        # every vertex lies on the region's edge: within a pixel of a boundary pixel's centre
        distances = np.sqrt(((points[:, np.newaxis, :] - boundary[np.newaxis, :, :]) ** 2).sum(axis=2)).min(axis=1)
        assert distances.max() <= 1.0, distances.max()
        # the outline encloses the piece: its area is the piece's pixel count within 2 %
        assert _shoelace(points) == pytest.approx(pixels, rel=0.02)
        (area,) = group.get_measurements()
        assert area.name == codetable.AREA and area.value == pixels and area.unit.value == "{pixels}"
        assert group.finding_type == codetable.class_coding(LEFT_ARM).finding_type
        assert [site.laterality.value for site in group.finding_sites] == ["7771000"]  # Left

    # The largest piece's outline group is tracked as the region: the segment's Tracking UID, shared
    # with the TID 1411 group (OHIF merges the two and draws that outline); every other piece has a
    # UID of its own (a merged measurement is drawn from its first outline only).
    outline_uids = [str(g.tracking_uid) for g in sr.content.get_planar_roi_measurement_groups()]
    segment_uids = {str(item.TrackingUID) for item in seg.SegmentSequence}
    assert len(set(outline_uids)) == len(outline_uids)
    assert str(groups[0].tracking_uid) in segment_uids and str(groups[1].tracking_uid) not in segment_uids
    assert set(outline_uids) & segment_uids == segment_uids  # every segment's region has its outline
    # so every measurement OHIF builds from the SR has coordinates on the photo
    drawable = _ohif_drawable(pydicom.dcmread(paths["sr"]))
    assert all(drawable.values()), [uid for uid, ok in drawable.items() if not ok]
    # the image-level group's person count is INFERRED FROM the whole photo (TID 300 / TID 320)
    (image_group,) = [g for g in sr.content.get_image_measurement_groups()
                      if str(g.tracking_identifier) == "Persons in image"]
    (count,) = [m for m in image_group.get_measurements() if m.name == codetable.PERSON_COUNT]
    (whole,) = count.referenced_coordinates
    assert whole.RelationshipType == "INFERRED FROM" and whole.GraphicType == "POLYLINE"
    np.testing.assert_array_equal(np.asarray(whole.GraphicData).reshape(-1, 2),
                                  [[0, 0], [0, h], [w, h], [w, 0], [0, 0]])
    assert whole.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        case.dataset.SOPInstanceUID
    # the TID 1411 group referencing the SEG segment is still there, with the whole region's area
    (volumetric,) = sr.content.get_volumetric_roi_measurement_groups(tracking_uid=hd.UID(
        next(str(i.TrackingUID) for i in seg.SegmentSequence if i.TrackingID == "Left arm")))
    values = {m.name.value: m.value for m in volumetric.get_measurements()}
    assert values[codetable.AREA.value] == int(region.sum()) == sum(expected_pixels) + 3
    # the person and the face have one outline each, in one piece
    assert [str(g.tracking_identifier) for g in _outline_groups(sr, "Person 1")] == ["Person 1"]
    (face,) = _outline_groups(sr, "Face")
    np.testing.assert_array_equal(np.asarray(face.roi.GraphicData).reshape(-1, 2),
                                  [[60, 60], [60, 80], [90, 80], [90, 60], [60, 60]])


def noisy_region(h: int = 600, w: int = 800, seed: int = 7) -> np.ndarray:
    """A large disc with a ragged, noisy edge: specks outside, holes inside, thousands of corners."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:h, :w]
    distance = np.sqrt((rows - h / 2) ** 2 + (columns - w / 2) ** 2)
    return distance < 250 + 8 * rng.standard_normal((h, w))


def test_outline_point_count_is_bounded_for_a_large_noisy_region():
    from dicom_node.encode.outlines import MAX_OUTLINE_POINTS, MAX_PIECES, MIN_PIECE_AREA_PX, trace_outlines

    mask = noisy_region()
    outlines = trace_outlines(mask)
    assert 1 <= len(outlines) <= MAX_PIECES
    assert all(o.pixels >= MIN_PIECE_AREA_PX for o in outlines)
    assert [o.pixels for o in outlines] == sorted((o.pixels for o in outlines), reverse=True)
    unbounded = trace_outlines(mask, max_points=10**6)[0]
    assert len(unbounded.points) > 5 * MAX_OUTLINE_POINTS  # the bound really had work to do
    boundary = _boundary_pixel_centres(mask)
    for outline in outlines:
        assert 4 <= len(outline.points) <= MAX_OUTLINE_POINTS
        np.testing.assert_array_equal(outline.points[0], outline.points[-1])
        # simplification keeps vertices of the traced edge: each within a pixel of the boundary
        sample = outline.points[:: max(1, len(outline.points) // 50)]
        nearest = np.sqrt(((sample[:, np.newaxis, :] - boundary[np.newaxis, :, :]) ** 2).sum(axis=2)).min(axis=1)
        assert nearest.max() <= 1.0
    # the simplified outline of the big piece still encloses about the same area (holes included)
    assert outlines[0].enclosed_area_px == pytest.approx(unbounded.enclosed_area_px, rel=0.03)


@pytest.mark.parametrize(
    ("mask_rows", "expected"),
    [
        (["#"], [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]),  # one pixel: its four corners
        (["##", "#."], [[0, 0], [0, 2], [1, 2], [1, 1.5], [1.5, 1], [2, 1], [2, 0], [0, 0]]),  # inward corner cut
    ],
)
def test_outline_runs_along_pixel_edges_in_image_coordinates(mask_rows, expected):
    from dicom_node.encode.outlines import trace_outlines

    mask = np.zeros((6, 7), dtype=bool)
    for r, line in enumerate(mask_rows):
        for c, char in enumerate(line):
            mask[2 + r, 3 + c] = char == "#"
    (outline,) = trace_outlines(mask, min_area_px=1)
    np.testing.assert_array_equal(outline.points, np.asarray(expected, dtype=np.float32) + [3, 2])
    assert outline.points.dtype == np.float32


def test_a_piece_in_a_hole_counts_with_the_piece_around_it():
    from dicom_node.encode.outlines import trace_outlines

    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 5:35] = True
    mask[10:30, 10:30] = False  # a hole ...
    mask[15:25, 15:25] = True  # ... with a piece of the same region in it
    (outline,) = trace_outlines(mask)
    assert outline.pixels == int(mask.sum()) == 30 * 30 - 20 * 20 + 10 * 10
    assert outline.enclosed_area_px == 30 * 30  # the outer edge only: holes are not outlined


def test_outline_refuses_what_is_not_a_region():
    from dicom_node.encode.outlines import trace_outlines

    assert trace_outlines(np.zeros((8, 8), dtype=bool)) == []
    with pytest.raises(ValueError, match="2-D"):
        trace_outlines(np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="at least 4 points"):
        trace_outlines(np.ones((8, 8), dtype=bool), max_points=3)


@needs_dciodvfy
def test_sr_with_a_noisy_region_stays_bounded_and_valid(tmp_path):
    from dicom_node.encode.outlines import MAX_OUTLINE_POINTS, MAX_PIECES

    region = noisy_region(300, 400, seed=3)
    label_map = np.where(region, np.uint8(5), np.uint8(0))  # upper clothes
    result = result_from_label_map(label_map, [region])
    case = PhotoCase("rgb", make_vl_photo(synthetic_rgb(300, 400)), synthetic_rgb(300, 400))
    encoded = encode_results(case.dataset, case.rgb, result, overlay(case.rgb, label_map),
                             EncodeOptions(content_datetime=FIXED_TIME))
    path = write_all(encoded, tmp_path)["sr"]
    assert_dciodvfy_clean(path, case)
    sr = hd.sr.srread(path)
    clothes = _outline_groups(sr, "Upper clothes")
    assert 1 <= len(clothes) <= MAX_PIECES
    for group in sr.content.get_planar_roi_measurement_groups():
        assert 4 <= len(group.roi.GraphicData) // 2 <= MAX_OUTLINE_POINTS
