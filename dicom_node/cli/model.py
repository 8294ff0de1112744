"""``dicom-node model fetch | make-test``: get the official weights, or write an untrained test model."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
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
