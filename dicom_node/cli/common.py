"""What several commands share: the node configuration, read or explained."""

from __future__ import annotations

import argparse
import sys

from dicom_node.config import ConfigError, NodeConfig, load_config


def load_or_explain(args: argparse.Namespace) -> NodeConfig | None:
    """Load the configuration, or print why not (naming the key) and return None."""
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
