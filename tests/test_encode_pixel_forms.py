"""End to end, for every pixel form a photo can arrive in: decode, parse, build SEG + SC + SR, read back.

Each case writes a photo file in one pixel form (uncompressed RGB with planar configuration 0
and 1, also at an odd size; JPEG Baseline YBR_FULL_422 made by dcmtk's img2dcm; JPEG Lossless;
JPEG-LS; JPEG 2000; RLE; MONOCHROME1 and MONOCHROME2), reads it back with pydicom so that the
transfer syntax is the real one, decodes it with ``photo_from_dataset``, parses it with the tiny
untrained M2FP, renders the overlay and builds the three result objects.  Then:

* dciodvfy prints no Error line for the SEG, the SC or the SR;
* highdicom reads the SEG back and every segment's mask equals ``label_map == class`` (parts)
  or the person's mask (persons), each segment found by its Tracking ID;
* highdicom reads the SR back and its areas equal the statistics (and the SEG's masks);
* SEG and SC have the photo's Rows and Columns; all three reference the photo's SOP Instance
  UID and carry its Study Instance UID.

Corrupt files (truncated, Pixel Data dropped, Rows that lie) give a typed
:class:`~dicom_node.decode.errors.PhotoError` with a readable reason, never another exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.decode.errors import CorruptPhotoError, PhotoError
from dicom_node.decode.photo import load_photo, photo_from_dataset
from dicom_node.encode import codes as codetable
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import EncodedResults, encode_results
from dicom_node.encode.validate import validate
from dicom_node.parse.engine import HumanParser
from dicom_node.parse.render import overlay
from dicom_node.parse.result import ParsingResult
from tests.photo_factory import (
    PATCH_COLOURS,
    SECONDARY_CAPTURE,
    drop_pixel_data,
    inner,
    lie_about_rows,
    make_grey_photo,
    make_jpeg_photo_with_img2dcm,
    make_vl_photo,
    patch_boxes,
    synthetic_rgb,
    truncate_file,
    write_dataset,
)

H, W = 120, 160  # small, so that the whole file runs in seconds
ODD_H, ODD_W = 97, 131  # odd rows and columns: padding, row strides, odd-length Pixel Data

# The one warning dciodvfy gives for our objects: the private scheme 99M2FP is declared in the
# Coding Scheme Identification Sequence but is not in dciodvfy's list of designators.
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99M2FP> for value 1 of attribute <Coding Scheme Designator>"


# --------------------------------------------------------------------------------- pixel forms


def grey_of(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(axis=2).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PixelForm:
    """One way a photo's pixels can be stored, and what a correct decoder must give back."""

    name: str
    size: tuple[int, int]
    write: Callable[[np.ndarray, Path], Path]  # source RGB, folder -> file of the photo
    expected_ts: str
    lossless: bool = True
    grey: bool = False  # the photo stores grey_of(rgb), so the model sees three equal channels

    def expected_rgb(self, rgb: np.ndarray) -> np.ndarray:
        if self.grey:
            return np.repeat(grey_of(rgb)[:, :, np.newaxis], 3, axis=2)
        return rgb


def _dataset_writer(build: Callable[[np.ndarray], Dataset]) -> Callable[[np.ndarray, Path], Path]:
    def write(rgb: np.ndarray, folder: Path) -> Path:
        return write_dataset(build(rgb), folder / "photo.dcm")

    return write


def _vl(transfer_syntax: str = ExplicitVRLittleEndian, **kwargs) -> Callable[[np.ndarray, Path], Path]:
    return _dataset_writer(lambda rgb: make_vl_photo(rgb, transfer_syntax, **kwargs))


def _img2dcm(rgb: np.ndarray, folder: Path) -> Path:
    return make_jpeg_photo_with_img2dcm(rgb, folder)


# MONOCHROME1 is not allowed in the VL Photographic Image IOD (C.8.12.1): a valid MONOCHROME1
# photo is a Secondary Capture image, which the node accepts too.
_mono1 = _dataset_writer(
    lambda rgb: make_grey_photo(grey_of(rgb), "MONOCHROME1", sop_class=SECONDARY_CAPTURE)
)
_mono2 = _dataset_writer(lambda rgb: make_grey_photo(grey_of(rgb), "MONOCHROME2"))

FORMS = [
    PixelForm("rgb-planar0", (H, W), _vl(planar_configuration=0), ExplicitVRLittleEndian),
    PixelForm("rgb-planar1", (H, W), _vl(planar_configuration=1), ExplicitVRLittleEndian),
    PixelForm("rgb-planar0-odd", (ODD_H, ODD_W), _vl(planar_configuration=0), ExplicitVRLittleEndian),
    PixelForm("rgb-planar1-odd", (ODD_H, ODD_W), _vl(planar_configuration=1), ExplicitVRLittleEndian),
    PixelForm("rgb-implicit-vr", (H, W), _vl(ImplicitVRLittleEndian), ImplicitVRLittleEndian),
    PixelForm("jpeg-baseline-img2dcm", (H, W), _img2dcm, JPEGBaseline8Bit, lossless=False),
    PixelForm("jpeg-lossless-sv1", (H, W), _vl(JPEGLosslessSV1), JPEGLosslessSV1),
    PixelForm("jpeg-lossless", (H, W), _vl(JPEGLossless), JPEGLossless),
    PixelForm("jpeg-ls-lossless", (H, W), _vl(JPEGLSLossless), JPEGLSLossless),
    PixelForm("jpeg-ls-near-lossless", (H, W), _vl(JPEGLSNearLossless), JPEGLSNearLossless, lossless=False),
    PixelForm("jpeg2000-lossless", (H, W), _vl(JPEG2000Lossless), JPEG2000Lossless),
    PixelForm("jpeg2000-lossless-rct", (H, W), _vl(JPEG2000Lossless, photometric="YBR_RCT"), JPEG2000Lossless),
    PixelForm("jpeg2000-lossy-ict", (H, W), _vl(JPEG2000, photometric="YBR_ICT"), JPEG2000, lossless=False),
    PixelForm("rle", (H, W), _vl(RLELossless), RLELossless),
    PixelForm("rle-planar1-label", (H, W), _vl(RLELossless, planar_configuration=1), RLELossless),
    PixelForm("monochrome1", (H, W), _mono1, ExplicitVRLittleEndian, grey=True),
    PixelForm("monochrome2", (H, W), _mono2, ExplicitVRLittleEndian, grey=True),
]
FORMS_BY_NAME = {form.name: form for form in FORMS}
FORM_IDS = [form.name for form in FORMS]
# A grey portrait: with the tiny model it once met the MaskUpsampler.window IndexError (a query
# positive only in source columns that no pixel of the shrunk photo reads); kept as a regression case.
PORTRAIT_GREY = PixelForm("monochrome2-portrait", (W, H), _mono2, ExplicitVRLittleEndian, grey=True)
PIPELINE_CASES = [pytest.param(form, id=form.name) for form in (*FORMS, PORTRAIT_GREY)]

# The required forms named by the requirement, each covered above.
REQUIRED = {
    "rgb-planar0", "rgb-planar1", "jpeg-baseline-img2dcm", "jpeg-lossless-sv1", "jpeg-ls-lossless",
    "jpeg2000-lossless", "rle", "monochrome1", "monochrome2",
}


def source_rgb(form: PixelForm) -> np.ndarray:
    return synthetic_rgb(*form.size)


def write_and_read(form: PixelForm, folder: Path) -> tuple[Path, Dataset]:
    """The photo as a file and as pydicom reads that file back (the real transfer syntax)."""
    path = form.write(source_rgb(form), folder)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == form.expected_ts
    assert (int(ds.Rows), int(ds.Columns)) == form.size
    return path, ds


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def parser(small_model_dir: Path) -> Iterator[HumanParser]:
    # One thread: on a busy 2-core machine two threads often wait on each other (a 0.4 s
    # parse then takes several seconds); one is steady and leaves the other core free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield HumanParser.from_model_dir(small_model_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parse(parser: HumanParser) -> Callable[[np.ndarray], ParsingResult]:
    """``parser.parse``, run once per distinct decoded image.

    The network costs the same for every form (photos are resized to the model's input size
    first), and many forms decode to the very same bytes (every lossless colour form of one
    size): the parser is deterministic, so those forms share one run. The key is a digest of
    the exact pixels, so a form that decodes even one value differently gets its own run.
    """
    cache: dict[tuple[tuple[int, ...], str], ParsingResult] = {}

    def run(rgb: np.ndarray) -> ParsingResult:
        key = (rgb.shape, hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest())
        if key not in cache:
            cache[key] = parser.parse(rgb)
        return cache[key]

    return run


@dataclasses.dataclass
class Pipeline:
    form: PixelForm
    photo_path: Path
    photo: Dataset
    rgb: np.ndarray
    result: ParsingResult
    overlay: np.ndarray
    encoded: EncodedResults
    paths: dict[str, Path]


def run_pipeline(form: PixelForm, parse: Callable[[np.ndarray], ParsingResult], folder: Path) -> Pipeline:
    photo_path, ds = write_and_read(form, folder)
    rgb = photo_from_dataset(ds).rgb
    result = parse(rgb)
    image = overlay(rgb, result.label_map)
    encoded = encode_results(ds, rgb, result, image, EncodeOptions())
    assert encoded.seg is not None
    paths = {}
    for kind, obj in (("seg", encoded.seg), ("sc", encoded.sc), ("sr", encoded.sr)):
        paths[kind] = write_dataset(obj, folder / f"result_{kind}.dcm")
    return Pipeline(form, photo_path, ds, rgb, result, image, encoded, paths)


def referenced_sop_instance_uids(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID (0008,1155) anywhere in ``ds``, nested sequences included."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID" and elem.value:
            found.add(str(elem.value))
    return found


# --------------------------------------------------------------------------------- the cases


def test_every_required_form_is_covered():
    assert REQUIRED <= set(FORMS_BY_NAME)


@pytest.mark.parametrize("form", PIPELINE_CASES)
def test_photo_form_to_valid_seg_sc_sr(form: PixelForm, parse, tmp_path: Path):
    run = run_pipeline(form, parse, tmp_path)
    photo, result, encoded = run.photo, run.result, run.encoded
    rows, columns = form.size
    photo_uid = str(photo.SOPInstanceUID)

    # The model really found something, so the SEG carries real part and person masks.
    assert run.rgb.shape == (rows, columns, 3)
    assert result.label_map.shape == (rows, columns)
    classes = result.classes_present()
    assert classes, "the tiny model found no part: the SEG would not be exercised"
    assert result.persons, "the tiny model found no person: person segments would not be exercised"

    # dciodvfy (required, like dcmtk: a missing tool fails here instead of skipping the proof):
    # no Error line for any of the three objects, and no Warning but the private coding
    # scheme's (declared, not in dciodvfy's registry) or one the photo has itself (img2dcm's
    # photo has no Study Date/Time/ID, which the results copy as they are).
    inherited = set(validate(run.photo_path).warnings)
    for kind, path in run.paths.items():
        report = validate(path)
        assert report.errors == [], f"dciodvfy errors in the {kind.upper()} of {form.name}:\n" + "\n".join(
            report.errors
        )
        unexpected = sorted({w for w in report.warnings if PRIVATE_SCHEME_WARNING not in w} - inherited)
        assert unexpected == [], f"dciodvfy warnings in the {kind.upper()} of {form.name}: {unexpected}"

    seg = hd.seg.segread(run.paths["seg"])
    sc = pydicom.dcmread(run.paths["sc"])
    sr = hd.sr.srread(run.paths["sr"])

    # Size, identity and references.
    assert (seg.Rows, seg.Columns) == (rows, columns)
    assert (sc.Rows, sc.Columns) == (rows, columns)
    for kind, obj in (("SEG", seg), ("SC", sc), ("SR", sr)):
        assert obj.StudyInstanceUID == photo.StudyInstanceUID, kind
        assert photo_uid in referenced_sop_instance_uids(obj), f"the {kind} does not reference the photo"
        assert obj.SOPInstanceUID != photo_uid
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == photo_uid

    # SEG: one segment per class present, then one per person, found by Tracking ID.
    numbers = {str(item.TrackingID): int(item.SegmentNumber) for item in seg.SegmentSequence}
    class_ids = {codetable.class_coding(c).label: c for c in classes}
    person_ids = {f"Person {p.index + 1}": p for p in result.persons}
    assert set(numbers) == set(class_ids) | set(person_ids)
    assert sorted(numbers.values()) == list(range(1, len(numbers) + 1))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[photo_uid], combine_segments=False
    )[0]
    assert pixels.shape == (rows, columns, len(numbers))
    seg_masks = {tid: pixels[:, :, number - 1].astype(bool) for tid, number in numbers.items()}
    for tid, class_index in class_ids.items():
        assert seg.get_segment_description(numbers[tid]).segment_label == tid
        np.testing.assert_array_equal(seg_masks[tid], result.label_map == class_index, err_msg=tid)
    for tid, person in person_ids.items():
        np.testing.assert_array_equal(seg_masks[tid], person.mask, err_msg=tid)
    assert sum(int(seg_masks[tid].sum()) for tid in class_ids) == int(np.count_nonzero(result.label_map))

    # SR: the areas are the statistics, and the statistics are the label map and the SEG.
    statistics = encoded.statistics
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    report = sr.content
    (image_group,) = [
        g for g in report.get_image_measurement_groups() if g.tracking_identifier == "Persons in image"
    ]
    image_values = {m.name.value: m.value for m in image_group.get_measurements()}
    assert image_values[codetable.PERSON_COUNT.value] == statistics.person_count == len(result.persons)
    assert image_values[codetable.AREA.value] == statistics.person_pixels
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    assert set(groups) == set(numbers)
    assert [r.class_index for r in statistics.regions] == classes
    for region in statistics.regions:
        tid = codetable.class_coding(region.class_index).label
        assert region.pixels == int(np.count_nonzero(result.label_map == region.class_index))
        group = groups[tid]
        segment_ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert segment_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert segment_ref.ReferencedSegmentNumber == numbers[tid]
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values[codetable.AREA.value] == region.pixels == int(seg_masks[tid].sum())
        assert values[codetable.AREA_PERCENT_OF_IMAGE.value] == pytest.approx(100 * region.image_fraction)
        assert values[codetable.AREA_PERCENT_OF_PERSONS.value] == pytest.approx(100 * region.person_fraction)
    for person in statistics.persons:
        tid = f"Person {person.person_index + 1}"
        values = {m.name.value: m.value for m in groups[tid].get_measurements()}
        assert values[codetable.AREA.value] == person.pixels == int(seg_masks[tid].sum())
        assert values[codetable.AREA_PERCENT_OF_IMAGE.value] == pytest.approx(100 * person.image_fraction)

    # What OHIF needs to draw them: the SEG's shared Pixel Measures and Plane Orientation; in the
    # SR, closed POLYLINE outlines on the photo, within its pixel matrix (C.10.5.1.2).
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.0, 1.0]
    assert "SpacingBetweenSlices" in shared.PixelMeasuresSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    outlines = report.get_planar_roi_measurement_groups()
    assert outlines, "no region outline in the SR"
    for group in outlines:
        points = np.asarray(group.roi.GraphicData, dtype=float).reshape(-1, 2)
        assert group.roi.GraphicType == "POLYLINE" and tuple(points[0]) == tuple(points[-1])
        assert points.min() >= 0 and points[:, 0].max() <= columns and points[:, 1].max() <= rows
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == photo_uid

    # SC: the overlay exactly as rendered, at the photo's size.
    np.testing.assert_array_equal(sc.pixel_array, run.overlay)

    # Lossy source, lossy results (C.7.6.1.1.5): the SEG says so too.
    assert seg.LossyImageCompression == ("00" if form.lossless else "01")


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_decoded_pixels_are_what_the_model_should_see(form: PixelForm, tmp_path: Path):
    path, ds = write_and_read(form, tmp_path)
    decoded = photo_from_dataset(ds).rgb
    assert decoded.dtype == np.uint8 and decoded.shape == (*form.size, 3)
    np.testing.assert_array_equal(load_photo(path).rgb, decoded)  # same pixels by file or by dataset
    expected = form.expected_rgb(source_rgb(form))
    if form.lossless:
        np.testing.assert_array_equal(decoded, expected)
        return
    error = np.abs(decoded.astype(int) - expected.astype(int))
    if form.expected_ts == JPEGLSNearLossless:
        assert error.max() <= 2  # the factory's NEAR parameter
    else:
        assert error.mean() < 6
    # the flat patches keep their colours: no channel swap, no YCbCr left unconverted
    for name, colour in PATCH_COLOURS.items():
        rows, cols = inner(patch_boxes(*form.size)[name])
        patch = decoded[rows, cols].reshape(-1, 3).astype(int)
        assert np.abs(patch.mean(axis=0) - colour).max() < 12, name


def test_jpeg_baseline_decodes_like_the_pipeline_reads_the_jpeg(tmp_path: Path):
    """img2dcm wraps the JPEG unchanged: the node gives the model Pillow's pixels of that JPEG."""
    form = FORMS_BY_NAME["jpeg-baseline-img2dcm"]
    path, ds = write_and_read(form, tmp_path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    with Image.open(path.with_suffix(".jpg")) as img:
        expected = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(photo_from_dataset(ds).rgb, expected)


def test_monochrome1_is_inverted(tmp_path: Path):
    form = FORMS_BY_NAME["monochrome1"]
    grey = grey_of(source_rgb(form))
    _, ds = write_and_read(form, tmp_path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(form.size)
    np.testing.assert_array_equal(stored, 255 - grey)  # white is stored as 0
    decoded = photo_from_dataset(ds).rgb
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], grey)
    white = inner(patch_boxes(*form.size)["white"])
    assert (decoded[white] == 255).all()


# --------------------------------------------------------------------------------- corrupt input


def _truncate_in_pixel_data(path: Path) -> None:
    data = path.read_bytes()
    start = data.rfind(b"\xe0\x7f\x10\x00")  # the Pixel Data tag, little endian
    assert start > 132, "no Pixel Data element found"
    truncate_file(path, start + (len(data) - start) // 2)  # halfway through its value


def _truncate_in_header(path: Path) -> None:
    truncate_file(path, 300)


def _rewrite(path: Path, change: Callable[[Dataset], object]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated-in-pixel-data": _truncate_in_pixel_data,
    "truncated-in-header": _truncate_in_header,
    "pixel-data-dropped": lambda path: _rewrite(path, drop_pixel_data),
    "rows-too-many": lambda path: _rewrite(path, lambda ds: lie_about_rows(ds, int(ds.Rows) + 7)),
    "rows-too-few": lambda path: _rewrite(path, lambda ds: lie_about_rows(ds, int(ds.Rows) // 2)),
}
CORRUPTED_FORMS = ["rgb-planar0", "rgb-planar1-odd", "jpeg-baseline-img2dcm", "jpeg-ls-lossless",
                   "jpeg2000-lossless", "rle", "monochrome1"]

CORRUPT_CASES = [
    pytest.param(form, corruption, id=f"{form}-{corruption}")
    for form in CORRUPTED_FORMS
    for corruption in CORRUPTIONS
]


def _assert_readable(err: PhotoError) -> None:
    assert isinstance(err.reason, str) and err.reason.strip()
    assert err.reason.isprintable() and "Traceback" not in err.reason
    assert len(err.reason) < 400


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.filterwarnings("ignore:The decoded RLE segment contains non-conformant padding:UserWarning")
@pytest.mark.parametrize(("form_name", "corruption"), CORRUPT_CASES)
def test_corrupt_photo_gives_the_typed_error(form_name: str, corruption: str, tmp_path: Path):
    form = FORMS_BY_NAME[form_name]
    path = form.write(source_rgb(form), tmp_path)
    CORRUPTIONS[corruption](path)

    # By file: pytest.raises lets any other exception type through, which fails the test.
    with pytest.raises(PhotoError) as by_file:
        load_photo(path)
    assert type(by_file.value) is CorruptPhotoError, by_file.value
    _assert_readable(by_file.value)
    assert str(path) in str(by_file.value)

    # By dataset, as the SCP would hand it over, when pydicom can still read the file at all.
    try:
        ds = pydicom.dcmread(path)
    except Exception:
        return  # load_photo covered this one: nothing reaches photo_from_dataset
    with pytest.raises(PhotoError) as by_dataset:
        photo_from_dataset(ds)
    assert type(by_dataset.value) is CorruptPhotoError, by_dataset.value
    _assert_readable(by_dataset.value)
