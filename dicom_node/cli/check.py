"""``dicom-node check``: the installation's checks (:mod:`dicom_node.checkup`) as one table.

The table is the output, on stdout; the stages' own log lines (a refused association, the
UNTRAINED warning) would only repeat its rows, so they are silenced unless ``--log-level`` (or
``DICOM_NODE_LOG_LEVEL``) asks for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from dicom_node.checkup import CheckRow, Status, check_installation, exit_status

_HEADERS = ("CHECK", "STATUS", "DETAIL")


def render(rows: Sequence[CheckRow]) -> str:
    """An aligned plain-text table, a FIX line under every row that needs something done, and the tally."""
    name_width = max(len(_HEADERS[0]), *(len(row.name) for row in rows))
    status_width = max(len(_HEADERS[1]), *(len(row.status.value) for row in rows))
    indent = " " * (name_width + status_width + 4)
    lines = [f"{_HEADERS[0]:<{name_width}}  {_HEADERS[1]:<{status_width}}  {_HEADERS[2]}"]
    for row in rows:
        first, *more = row.detail.splitlines() or [""]
        lines.append(f"{row.name:<{name_width}}  {row.status.value.upper():<{status_width}}  {first}")
        lines.extend(f"{indent}{line.strip()}" for line in more)
        if row.fix and row.status in (Status.WARN, Status.FAIL):
            lines.append(f"{indent}FIX: {row.fix}")
    counts = {status: sum(row.status is status for row in rows) for status in Status}
    tally = f"{counts[Status.OK]} ok, {counts[Status.WARN]} warnings, {counts[Status.FAIL]} failures"
    if counts[Status.SKIP]:
        tally += f" ({counts[Status.SKIP]} not checked)"
    return "\n".join([*lines, "", tally]) + "\n"


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    quiet = args.log_level is None and "DICOM_NODE_LOG_LEVEL" not in os.environ
    if quiet:
        logging.disable(logging.ERROR)  # CRITICAL still shows
    try:
        rows = check_installation(args.config)
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    (out or sys.stdout).write(render(rows))
    return exit_status(rows)
