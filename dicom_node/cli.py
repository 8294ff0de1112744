"""``dicom-node``: the one command-line entry point, with a sub-command per job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("dicom_node.cli")

DEFAULT_MODEL_DIR = Path(os.environ.get("DICOM_NODE_MODEL_DIR", "models/m2fp"))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                   help="ModelScope M2FP directory (configuration.json + pytorch_model.pt); default %(default)s")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parse", help="parse photos (JPEG, PNG, DICOM) and write label maps, overlays and JSON")
    p.add_argument("photos", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--lesion-mask", type=Path, action="append", default=[],
                   help="binary lesion mask image (same size as the photo); repeat once per photo, in order")
    p.add_argument("--dicom", action="store_true", help="also write <stem>_seg.dcm, _sc.dcm, _sr.dcm for DICOM input")
    p.add_argument("--no-progress", action="store_true")
    _add_model_args(p)

    m = sub.add_parser("model", help="get the weights or make an untrained test model")
    msub = m.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="download the official M2FP weights with modelscope (pip install '.[fetch]')")
    f.add_argument("--dir", type=Path, default=DEFAULT_MODEL_DIR)
    t = msub.add_parser("make-test", help="write an UNTRAINED model in the official layout, for tests and benchmarks")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--small", action="store_true", help="a tiny configuration for fast tests")
    return parser


def main(argv: list[str] | None = None) -> int:
    from dicom_node.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.command == "parse":
        from dicom_node.parse.batch import run_parse

        return run_parse(args)
    if args.command == "model":
        return _model(args)
    return 2


def _model(args: argparse.Namespace) -> int:
    if args.model_command == "make-test":
        from dicom_node.model.untrained import make_test_model_dir

        path = make_test_model_dir(args.dir, small=args.small)
        print(f"wrote an UNTRAINED {'small ' if args.small else ''}M2FP model (random weights) to {path}")
        return 0
    from dicom_node.model.fetch import LICENCE_NOTE, FetchError, fetch_model

    try:
        path = fetch_model(args.dir)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"M2FP weights ready in {path}. {LICENCE_NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
