"""``dicom-node parse``: many photos, one model load; a bad file is reported and skipped, never fatal."""

from __future__ import annotations

import argparse
import logging
import sys
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
from dicom_node.parse.tbsa import Method, TbsaEstimate, View, patient_age_years, view_of

log = logging.getLogger(__name__)


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
    progress = None
    if len(photos) > 1 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(photos), unit="photo", file=sys.stderr)
    for i, path in enumerate(photos):
        try:
            failures += not _parse_one(parser, path, args, i, used)
        finally:
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    if failures:
        print(f"{failures} of {len(photos)} photo(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _parse_one(parser: HumanParser, path: Path, args: argparse.Namespace, index: int, used: set[str]) -> bool:
    try:
        photo = load_photo(path)
        lesion = load_lesion_mask(args.lesion_mask[index]) if args.lesion_mask else None
        result = parser.parse(photo.rgb)
        stem = _unique_stem(path, used)
        tbsa = _photo_tbsa(photo.dataset, result, lesion, args) if lesion is not None else None
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


def _photo_tbsa(ds: Dataset | None, result: ParsingResult, lesion: np.ndarray,
                args: argparse.Namespace) -> TbsaEstimate:
    """The photo's %TBSA: view and age from the options, else from the DICOM dataset (else unknown)."""
    view = View(args.view) if getattr(args, "view", None) else (view_of(ds) if ds is not None else None)
    age = getattr(args, "age", None)
    if age is None and ds is not None:
        age = patient_age_years(ds)
    return photo_tbsa(result, lesion, view, age, Method(getattr(args, "tbsa_method", Method.LUND_BROWDER)))


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
