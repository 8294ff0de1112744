"""``dicom-node parse``: many photos, one model load; a bad file is reported and skipped, never fatal."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from dicom_node.decode.errors import PhotoError
from dicom_node.decode.photo import load_photo
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import encode_results
from dicom_node.model.checkpoint import ModelLoadError
from dicom_node.parse.engine import HumanParser
from dicom_node.parse.report import UNTRAINED_WARNING, photo_tbsa, write_parse_outputs
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.tbsa import (
    Method,
    PhotoLesion,
    TbsaEstimate,
    View,
    estimate_tbsa,
    patient_age_years,
    view_of,
)

log = logging.getLogger(__name__)

STUDY_TBSA_FILE = "study_tbsa.json"
NON_DICOM_STUDY = "non-DICOM photos given together"


@dataclass(frozen=True)
class _ParsedLesion:
    """What the study's combined %TBSA needs of one parsed photo with a lesion mask."""

    source: str
    study: str  # the Study Instance UID, or NON_DICOM_STUDY
    patient_id: str | None
    lesion: PhotoLesion
    view_from: str  # "option", "dicom" or "assumed"
    age_years: float | None


def load_lesion_mask(path: Path) -> np.ndarray:
    """Any non-zero pixel of the (grey-converted) mask image counts as lesion."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 0


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem)
    return stem


def run_parse(args: argparse.Namespace) -> int:
    photos: list[Path] = args.photos
    if args.lesion_mask and len(args.lesion_mask) != len(photos):
        print(f"error: {len(args.lesion_mask)} --lesion-mask for {len(photos)} photos; give one per photo",
              file=sys.stderr)
        return 2
    views = list(getattr(args, "view", None) or [])
    if len(views) not in (0, 1, len(photos)):
        print(f"error: {len(views)} --view for {len(photos)} photos; give one for all, or one per photo",
              file=sys.stderr)
        return 2
    try:
        parser = HumanParser.from_model_dir(args.model_dir, threads=args.threads, postprocess_mode=args.postprocess,
                                            runtime=args.runtime)
    except ModelLoadError as exc:
        print(f"error: cannot load the model: {exc}\n"
              "Get the weights with `dicom-node model fetch`, or for tests `dicom-node model make-test --dir DIR`.",
              file=sys.stderr)
        return 1
    if parser.untrained:
        print(f"warning: {UNTRAINED_WARNING}", file=sys.stderr)

    failures = 0
    used: set[str] = set()
    parsed: list[_ParsedLesion] = []
    progress = None
    if len(photos) > 1 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(photos), unit="photo", file=sys.stderr)
    for i, path in enumerate(photos):
        try:
            failures += not _parse_one(parser, path, args, i, used, parsed)
        finally:
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    if len(parsed) > 1:
        _write_study_tbsa(parsed, args)
    if failures:
        print(f"{failures} of {len(photos)} photo(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _write_study_tbsa(parsed: list[_ParsedLesion], args: argparse.Namespace) -> None:
    """One %TBSA estimate per study from its photos' lesion masks (issue 15: front and back photos of
    one patient in one study combine), written to ``study_tbsa.json``. Photos of one DICOM study
    with different Patient IDs are not combined (an error line; each keeps its own estimate)."""
    studies: dict[str, list[_ParsedLesion]] = {}
    for item in parsed:
        studies.setdefault(item.study, []).append(item)
    out = []
    for study, items in studies.items():
        patients = {i.patient_id for i in items if i.patient_id is not None}
        if len(patients) > 1:
            print(f"error: study {study}: its photos name {len(patients)} different patients; not combined",
                  file=sys.stderr)
            continue
        age = getattr(args, "age", None)
        if age is None:
            age = next((i.age_years for i in items if i.age_years is not None), None)
        estimate = estimate_tbsa([i.lesion for i in items], age, Method(getattr(args, "tbsa_method", None)
                                                                         or Method.LUND_BROWDER))
        assumed = [i.source for i in items if i.view_from == "assumed"]
        warnings = [f"view unknown for {', '.join(assumed)}: taken as anterior (give --view)"] if assumed else []
        entry = estimate.to_json()
        entry["warnings"] = warnings + entry["warnings"]
        out.append({"study": study, "photos": [{"source": i.source, "view": str(i.lesion.view),
                                                "view_from": i.view_from} for i in items], "tbsa": entry})
        print(f"study {study}: {len(items)} photo(s), view {estimate.view}: estimated {estimate.percent:.2f} %TBSA "
              f"burnt of {estimate.visible_percent:.1f} %TBSA seen", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / STUDY_TBSA_FILE).write_text(json.dumps({"studies": out}, indent=1), encoding="utf-8")


def _parse_one(parser: HumanParser, path: Path, args: argparse.Namespace, index: int, used: set[str],
               parsed: list[_ParsedLesion] | None = None) -> bool:
    try:
        photo = load_photo(path)
        lesion = load_lesion_mask(args.lesion_mask[index]) if args.lesion_mask else None
        result = parser.parse(photo.rgb)
        stem = _unique_stem(path, used)
        tbsa = None
        if lesion is not None:
            tbsa = _photo_tbsa(photo.dataset, result, lesion, args, index)
            if parsed is not None:
                parsed.append(_parsed_lesion(str(path), photo.dataset, result, lesion, args, index))
        write_parse_outputs(photo.rgb, result, args.out, stem, str(path), lesion, tbsa=tbsa)
        if args.dicom:
            _write_dicom(photo, result, args.out, stem, lesion, tbsa)
    except PhotoError as exc:
        print(f"error: {path}: {exc.reason}", file=sys.stderr)
        return False
    except (OSError, ValueError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return False
    log.info("parsed %s: %d person(s), %d part instance(s), %.2f s", path.name, result.person_count,
             len(result.parts), result.timings_s.get("total", 0.0))
    return True


def _view_option(args: argparse.Namespace, index: int) -> View | None:
    views = list(getattr(args, "view", None) or [])
    if not views:
        return None
    return View(views[0] if len(views) == 1 else views[index])


def _photo_tbsa(ds: Dataset | None, result: ParsingResult, lesion: np.ndarray,
                args: argparse.Namespace, index: int = 0) -> TbsaEstimate:
    """The photo's %TBSA: view and age from the options, else from the DICOM dataset (else unknown)."""
    view = _view_option(args, index) or (view_of(ds) if ds is not None else None)
    age = getattr(args, "age", None)
    if age is None and ds is not None:
        age = patient_age_years(ds)
    return photo_tbsa(result, lesion, view, age, Method(getattr(args, "tbsa_method", Method.LUND_BROWDER)))


def _parsed_lesion(source: str, ds: Dataset | None, result: ParsingResult, lesion: np.ndarray,
                   args: argparse.Namespace, index: int) -> _ParsedLesion:
    option = _view_option(args, index)
    from_dicom = view_of(ds) if ds is not None else None
    view, view_from = ((option, "option") if option is not None else
                       (from_dicom, "dicom") if from_dicom is not None else (View.ANTERIOR, "assumed"))
    mask = np.asarray(lesion)
    if mask.ndim == 3:
        mask = np.any(mask != 0, axis=2)
    study = str(ds.get("StudyInstanceUID", "") or "") if ds is not None else ""
    return _ParsedLesion(
        source=source,
        study=study or NON_DICOM_STUDY,
        patient_id=str(ds.get("PatientID", "") or "") if ds is not None else None,
        lesion=PhotoLesion(result.label_map, mask != 0, view),
        view_from=view_from,
        age_years=patient_age_years(ds) if ds is not None else None,
    )


def _write_dicom(photo, result, out_dir: Path, stem: str, lesion: np.ndarray | None,
                 tbsa: TbsaEstimate | None = None) -> None:
    if photo.dataset is None:
        print(f"note: {photo.source} is not DICOM; --dicom writes DICOM results only for DICOM input",
              file=sys.stderr)
        return
    write_results(photo.dataset, photo.rgb, result, out_dir, stem, lesion_mask=lesion, tbsa=tbsa)


def write_results(photo_ds: Dataset, photo_rgb: np.ndarray, result: ParsingResult, out_dir: Path, stem: str,
                  options: EncodeOptions | None = None, lesion_mask: np.ndarray | None = None,
                  tbsa: TbsaEstimate | None = None) -> dict[str, object]:
    """Build the three objects and write ``<stem>_seg.dcm``, ``_sc.dcm``, ``_sr.dcm`` (``dicom-node parse --dicom``).

    Lets a PACS administrator inspect exactly what the node would send before wiring it to a PACS.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = encode_results(photo_ds, photo_rgb, result, None, options, lesion_mask, tbsa=tbsa)
    paths: dict[str, object] = {}
    for kind, ds in (("seg", encoded.seg), ("sc", encoded.sc), ("sr", encoded.sr)):
        if ds is None:
            continue
        path = out_dir / f"{stem}_{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[kind] = path
    return paths
