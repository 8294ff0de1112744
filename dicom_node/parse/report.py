"""The per-photo outputs of ``dicom-node parse``: label, colour and overlay PNGs and a JSON report.

The JSON is also what the REST API returns, so both describe a parsing the same way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.parse.render import color_label_map, overlay, save_png
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.statistics import lesion_statistics, region_statistics
from dicom_node.parse.tbsa import Method, PhotoLesion, TbsaEstimate, View, estimate_tbsa

UNTRAINED_WARNING = "UNTRAINED model (random weights): this parsing is meaningless; see README to get the real weights"
VIEW_UNKNOWN_WARNING = "view unknown: the photo was taken as anterior (give the view: --view, or View Code Sequence)"


def photo_tbsa(result: ParsingResult, lesion_mask: np.ndarray, view: View | None = None,
               age_years: float | None = None, method: Method = Method.LUND_BROWDER) -> TbsaEstimate:
    """The %TBSA estimate of one photo (:func:`dicom_node.parse.tbsa.estimate_tbsa`).

    An unknown view is taken as anterior, with a warning in the estimate: the chart's anterior
    and posterior halves differ by a few percent only for the trunk (buttocks), so the figure is
    still useful, but the reader must know it was assumed.
    """
    lesion = np.asarray(lesion_mask)
    if lesion.ndim == 3:
        lesion = np.any(lesion != 0, axis=2)
    estimate = estimate_tbsa([PhotoLesion(result.label_map, lesion != 0, view or View.ANTERIOR)], age_years, method)
    if view is None:
        estimate = dataclasses.replace(estimate, warnings=(VIEW_UNKNOWN_WARNING, *estimate.warnings))
    return estimate


def parse_report(result: ParsingResult, source: str, lesion_mask: np.ndarray | None = None,
                 view: View | None = None, age_years: float | None = None,
                 method: Method = Method.LUND_BROWDER, tbsa: TbsaEstimate | None = None) -> dict[str, Any]:
    """The JSON report of one parsing (``dicom-node parse`` and the REST API).

    With a lesion mask it has ``lesion`` (percent of each class) and ``tbsa`` (the estimated
    %TBSA, :meth:`TbsaEstimate.to_json`; ``view``, ``age_years``, ``method`` as in
    :func:`photo_tbsa`). ``tbsa`` given (already computed, e.g. for the SR too) is used as is.
    """
    stats = region_statistics(result)
    h, w = result.size_hw
    instances = [
        {"kind": "part", "label": p.label, "class_index": p.class_index, "score": p.score,
         "pixels": int(np.count_nonzero(p.mask)), "person_index": p.person_index, "query_index": p.query_index}
        for p in result.parts
    ] + [
        {"kind": "person", "label": result.class_names[-1], "class_index": len(result.class_names) - 1,
         "score": p.score, "pixels": int(np.count_nonzero(p.mask)), "person_index": p.index,
         "query_index": p.query_index}
        for p in result.persons
    ]
    report: dict[str, Any] = {
        "source": source,
        "image_size": {"width": w, "height": h},
        "classes": list(result.class_names),
        "person_count": result.person_count,
        "instances": instances,
        "regions": [vars(r) for r in stats.regions],
        "persons": [
            {"person_index": p.person_index, "score": p.score, "pixels": p.pixels, "image_fraction": p.image_fraction,
             "regions": [vars(r) for r in p.regions]}
            for p in stats.persons
        ],
        "person_pixels": stats.person_pixels,
        "model": {"digest": result.model_digest, "untrained": result.model_untrained, "runtime": result.runtime},
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
    }
    if result.model_untrained:
        report["warning"] = UNTRAINED_WARNING
    if lesion_mask is not None:
        report["lesion"] = [vars(r) for r in lesion_statistics(result, lesion_mask)]
        if tbsa is None:
            tbsa = photo_tbsa(result, lesion_mask, view, age_years, method)
    if tbsa is not None:
        report["tbsa"] = tbsa.to_json()
    return report


def write_parse_outputs(rgb: np.ndarray, result: ParsingResult, out_dir: Path, stem: str, source: str,
                        lesion_mask: np.ndarray | None = None, tbsa: TbsaEstimate | None = None) -> dict[str, Path]:
    """Write ``<stem>_labels.png`` (class indices), ``_color.png``, ``_overlay.png`` and ``<stem>.json``.

    ``tbsa``: the %TBSA estimate to report (see :func:`parse_report`; computed there as an
    anterior view of unknown age when a lesion mask is given without it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "labels": out_dir / f"{stem}_labels.png",
        "color": out_dir / f"{stem}_color.png",
        "overlay": out_dir / f"{stem}_overlay.png",
        "json": out_dir / f"{stem}.json",
    }
    save_png(result.label_map, paths["labels"])
    save_png(color_label_map(result.label_map), paths["color"])
    save_png(overlay(rgb, result.label_map), paths["overlay"])
    report = parse_report(result, source, lesion_mask, tbsa=tbsa)
    paths["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    return paths
