"""``dicom-node serve``: run the node until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse

from dicom_node.cli.common import load_or_explain


def run(args: argparse.Namespace) -> int:
    from dicom_node.logs import setup_logging
    from dicom_node.node import serve

    config = load_or_explain(args)
    if config is None:
        return 2
    setup_logging(args.log_level or config.log_level)
    return serve(config)
