"""The one logging set-up. Lines carry UIDs and job ids, never patient names or IDs."""

from __future__ import annotations

import logging
import os
import sys

_QUIET_LIBRARIES = ("pynetdicom", "highdicom")


def setup_logging(level: str | None = None) -> None:
    level_name = (level or os.environ.get("DICOM_NODE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level_name, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Third-party libraries log every C-STORE and every copied module at INFO, and pynetdicom's
    # DEBUG output can show dataset contents: keep them at WARNING so logs stay free of patient data.
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def fields(**values: object) -> str:
    """``key=value`` pairs (logfmt) for one structured log line; values with spaces are quoted.

    Only pass identifiers (job ids, UIDs, AE titles, states, reasons): never patient names or IDs.
    """
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' "=\t\n'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
