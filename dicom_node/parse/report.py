"""The per-photo outputs of ``dicom-node parse``: label, colour and overlay PNGs and a JSON report.

The JSON is also what the REST API returns, so both describe a parsing the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.parse.render import color_label_map, overlay, save_png
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.statistics import lesion_statistics, region_statistics

UNTRAINED_WARNING = "UNTRAINED model (random weights): this parsing is meaningless; see README to get the real weights"


def parse_report(result: ParsingResult, source: str, lesion_mask: np.ndarray | None = None) -> dict[str, Any]:
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
    return report


def write_parse_outputs(rgb: np.ndarray, result: ParsingResult, out_dir: Path, stem: str, source: str,
                        lesion_mask: np.ndarray | None = None) -> dict[str, Path]:
    """Write ``<stem>_labels.png`` (class indices), ``_color.png``, ``_overlay.png`` and ``<stem>.json``."""
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
    report = parse_report(result, source, lesion_mask)
    paths["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    return paths
