"""``dicom-node parse`` end to end, as a user runs it: a subprocess on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PARITY_DIR, official_instances, official_label_map
from tests.photo_factory import make_jpeg_photo_with_img2dcm, make_vl_photo, synthetic_rgb, write_dataset

FIXTURE_SHA256 = "1d4236bf2bcce3f52a61cffab15bfcf31be56d6843a0aaa58bccd9f297ac1aa1"
CLASSES = json.loads((PARITY_DIR / "configuration.json").read_text())["model"]["classes"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fixture_run(parity_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("parse_out")
    broken = out.parent / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    lesion = out.parent / "lesion.png"
    lesion_mask = np.zeros((768, 1024), np.uint8)
    lesion_mask[:, :512] = 255
    Image.fromarray(lesion_mask).save(lesion)
    proc = run_cli("parse", str(PARITY_DIR / "input.png"), str(broken), "--out", str(out),
                   "--model-dir", str(parity_model_dir), "--threads", "2", "--no-progress", "--runtime", "eager",
                   "--lesion-mask", str(lesion), "--lesion-mask", str(lesion))
    return out, proc


def test_bad_file_reported_and_others_processed(fixture_run) -> None:
    out, proc = fixture_run
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stderr and "1 of 2 photo(s) failed" in proc.stderr, proc.stderr
    assert "UNTRAINED" in proc.stderr
    assert (out / "input.json").exists()
    assert not (out / "broken.json").exists()


def test_label_png_matches_official_instances(fixture_run) -> None:
    out, _ = fixture_run
    img = Image.open(out / "input_labels.png")
    assert img.mode == "L" and img.size == (1024, 768)
    ours = np.asarray(img)
    official = official_label_map("landscape_1024x768")
    # Our masks differ from the official ones only where |mask logit| is ~1e-3 (float order);
    # the fixture README expects a few pixels per mask to flip.
    agreement = float((ours == official).mean())
    assert agreement >= 0.999, agreement
    color = np.asarray(Image.open(out / "input_color.png"))
    assert color.shape == (768, 1024, 3)
    overlay = np.asarray(Image.open(out / "input_overlay.png"))
    assert overlay.shape == (768, 1024, 3)


def test_json_report_matches_official(fixture_run) -> None:
    out, _ = fixture_run
    report = json.loads((out / "input.json").read_text())
    meta, _ = official_instances("landscape_1024x768")
    assert report["classes"] == CLASSES
    assert report["person_count"] == sum(1 for c in meta["class_id"] if c == 20)
    assert report["model"] == {"digest": FIXTURE_SHA256, "untrained": True, "runtime": "eager"}
    assert "UNTRAINED" in report["warning"]
    ours = sorted((i["label"], round(i["score"], 3)) for i in report["instances"])
    theirs = sorted((label, round(s, 3)) for label, s in zip(meta["labels"], meta["scores"], strict=True))
    assert len(ours) == len(theirs)
    for (la, sa), (lb, sb) in zip(ours, theirs, strict=True):
        assert la == lb and abs(sa - sb) <= 2e-3
    official = official_label_map("landscape_1024x768")
    for region in report["regions"]:
        expected = int((official == CLASSES.index(region["label"])).sum())
        assert abs(region["pixels"] - expected) <= 0.001 * official.size
        assert region["image_fraction"] == pytest.approx(region["pixels"] / official.size)
        assert 0 <= region["person_fraction"] <= 1
    for key in ("preprocess", "network", "postprocess", "total"):
        assert report["timings_s"][key] > 0


def test_lesion_percentages(fixture_run) -> None:
    out, _ = fixture_run
    report = json.loads((out / "input.json").read_text())
    official = official_label_map("landscape_1024x768")
    for row in report["lesion"]:
        region = official == CLASSES.index(row["label"])
        expected = 100.0 * region[:, :512].sum() / max(1, region.sum())
        assert row["lesion_percent"] == pytest.approx(expected, abs=0.5)


def test_dicom_and_many_inputs_with_small_model(small_model_dir: Path, tmp_path: Path) -> None:
    rgb = synthetic_rgb(120, 160)
    native = write_dataset(make_vl_photo(rgb), tmp_path / "native.dcm")
    jpeg = make_jpeg_photo_with_img2dcm(rgb, tmp_path)
    png = tmp_path / "photo.png"
    Image.fromarray(rgb).save(png)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(native.read_bytes()[:2000])
    out = tmp_path / "out"
    proc = run_cli("parse", str(native), str(jpeg), str(png), str(bad), "--out", str(out),
                   "--model-dir", str(small_model_dir))
    assert proc.returncode == 1, proc.stderr
    assert "bad.dcm" in proc.stderr and "truncated" in proc.stderr
    assert "photo/s" in proc.stderr or "it/s" in proc.stderr or "4/4" in proc.stderr  # progress bar
    for stem in ("native", jpeg.stem, "photo"):
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == (120, 160)
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["model"]["untrained"] is True
        assert sum(r["pixels"] for r in report["regions"]) == int((labels > 0).sum())


def test_missing_model_gives_clear_message(tmp_path: Path) -> None:
    proc = run_cli("parse", str(PARITY_DIR / "input.png"), "--out", str(tmp_path), "--model-dir",
                   str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert "model fetch" in proc.stderr and "make-test" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_make_test_cli_marks_model_untrained(tmp_path: Path) -> None:
    proc = run_cli("model", "make-test", "--dir", str(tmp_path / "m"), "--small")
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stdout
    assert "UNTRAINED" in (tmp_path / "m" / "UNTRAINED.txt").read_text()


def test_fetch_without_hub_says_so(tmp_path: Path) -> None:
    """The real modelscope client (a test dependency) against an unreachable hub: one clear message."""
    proc = run_cli("model", "fetch", "--dir", str(tmp_path / "m"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: cannot download damo/cv_resnet101_image-multiple-human-parsing" in proc.stderr
    assert "make-test" in proc.stderr and "modelscope download" in proc.stderr
    assert not (tmp_path / "m" / "pytorch_model.pt").exists()


def test_dicom_flag_writes_valid_seg_sc_sr(small_model_dir: Path, tmp_path: Path) -> None:
    import pydicom

    from dicom_node.encode.validate import run_dciodvfy

    rgb = synthetic_rgb(120, 160)
    photo_ds = make_vl_photo(rgb)
    src = write_dataset(photo_ds, tmp_path / "photo.dcm")
    png = tmp_path / "plain.png"
    Image.fromarray(rgb).save(png)
    out = tmp_path / "out"
    proc = run_cli("parse", str(src), str(png), "--dicom", "--out", str(out), "--model-dir", str(small_model_dir),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "not DICOM" in proc.stderr  # the PNG gets the PNG outputs, and a note instead of DICOM
    assert not (out / "plain_sc.dcm").exists()
    # the small untrained model finds parts on this image, so all three objects are written
    assert np.asarray(Image.open(out / "photo_labels.png")).any()
    written = [out / f"photo_{kind}.dcm" for kind in ("seg", "sc", "sr")]
    for path in written:
        assert run_dciodvfy(path) == [], path
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == photo_ds.StudyInstanceUID
        assert ds.SOPInstanceUID != photo_ds.SOPInstanceUID
        assert photo_ds.SOPInstanceUID.encode() in path.read_bytes()  # references the photo


def test_fast_postprocess_flag(small_model_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "photo.png"
    Image.fromarray(synthetic_rgb(300, 400)).save(png)
    outputs = {}
    for mode in ("exact", "fast"):
        out = tmp_path / mode
        proc = run_cli("parse", str(png), "--out", str(out), "--model-dir", str(small_model_dir),
                       "--postprocess", mode)
        assert proc.returncode == 0, proc.stderr
        outputs[mode] = np.asarray(Image.open(out / "photo_labels.png"))
    assert outputs["fast"].shape == outputs["exact"].shape == (300, 400)
    assert float((outputs["fast"] == outputs["exact"]).mean()) >= 0.98


def test_runtime_flag_and_auto_default(small_model_dir: Path, tmp_path: Path) -> None:
    """``auto`` (the default) logs its choice and agreement; the report names the runtime used."""
    png = tmp_path / "photo.png"
    Image.fromarray(synthetic_rgb(300, 400)).save(png)
    labels = {}
    for runtime in (None, "eager"):
        out = tmp_path / (runtime or "auto")
        proc = run_cli("parse", str(png), "--out", str(out), "--model-dir", str(small_model_dir), "--no-progress",
                       *(["--runtime", runtime] if runtime else []))
        assert proc.returncode == 0, proc.stderr
        report = json.loads((out / "photo.json").read_text())
        selected = [line for line in proc.stderr.splitlines() if "event=runtime.selected" in line]
        assert len(selected) == 1, proc.stderr
        assert f"runtime={report['model']['runtime']} " in selected[0]
        if runtime is None:
            assert "requested=auto" in selected[0] and "label agreement" in selected[0]
        else:
            assert report["model"]["runtime"] == "eager"
        labels[runtime] = np.asarray(Image.open(out / "photo_labels.png"))
    assert float((labels[None] == labels["eager"]).mean()) >= 0.995
    bad = run_cli("parse", str(png), "--out", str(tmp_path / "x"), "--model-dir", str(small_model_dir),
                  "--runtime", "tensorrt")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
