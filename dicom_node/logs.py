"""The one logging set-up. Lines carry UIDs and job ids, never patient names or IDs.

Two formats, chosen by ``log_format`` in the configuration (or ``--log-format``):

* ``text`` (the default): ``2024-05-01 12:00:00,123 INFO dicom_node.node: event=node.started ...``,
  for a person reading a terminal or ``journalctl``.
* ``json``: one JSON object a line for log shippers (Vector, Fluent Bit, Promtail, Filebeat),
  ``{"time": "...Z", "level": "INFO", "logger": "...", "message": "...", "event": "node.started", ...}``:
  the ``key=value`` fields of our structured lines (:func:`fields`) become keys of their own, so a
  shipper can filter on ``event`` or ``job`` without a parsing rule of its own.

JSON is written with the standard library (a :class:`logging.Formatter` subclass and :mod:`json`)
rather than python-json-logger or structlog: it is thirty lines, the node's lines already carry
their structure as logfmt, and one more dependency in a hospital's install is one more thing to
vet and patch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Literal, get_args

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_ENV = "DICOM_NODE_LOG_LEVEL"
LOG_FORMAT_ENV = "DICOM_NODE_LOG_FORMAT"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_QUIET_LIBRARIES = ("pynetdicom", "highdicom")

# The keys every JSON line has; a logfmt field of the same name is written as "<name>_field"
# rather than overwrite them (a shipper's pipeline relies on "level" being the record's level).
_RESERVED_KEYS = frozenset({"time", "level", "logger", "message", "exc", "stack"})

# One logfmt pair as fields() writes it: a bare value, or a quoted one with \\ and \" escaped.
_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s+|$)')
_UNESCAPE = re.compile(r"\\(.)")


def parse_fields(message: str) -> dict[str, str] | None:
    """The ``key=value`` pairs of a line written with :func:`fields`, or None when the message is
    not logfmt from start to end (free text such as a library's message keeps only ``message``:
    guessing pairs out of prose would invent keys)."""
    if not message or message[0].isspace():
        return None
    pairs: dict[str, str] = {}
    at = 0
    while at < len(message):
        match = _PAIR.match(message, at)
        if match is None:
            return None
        key, value = match.group(1), match.group(2)
        if value.startswith('"'):
            value = _UNESCAPE.sub(r"\1", value[1:-1])
        pairs[key] = value
        at = match.end()
    return pairs or None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped by :mod:`json`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            # UTC with a Z: shippers and the journal may sit in other time zones than the node.
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in (parse_fields(message) or {}).items():
            line[f"{key}_field" if key in _RESERVED_KEYS else key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(level: str | None = None, log_format: str | None = None) -> None:
    """Configure the root logger on stderr (the journal, under systemd) for this process.

    ``level`` defaults to ``$DICOM_NODE_LOG_LEVEL``, else INFO; ``log_format`` to
    ``$DICOM_NODE_LOG_FORMAT``, else text (``dicom-node serve`` exports the node's format there, so
    that the helper processes it starts write the same: see :mod:`dicom_node.cli.serve`).
    """
    level_name = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    format_name = (log_format or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if format_name not in LOG_FORMATS:
        raise ValueError(f"log format {format_name!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format_name == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level_name, logging.INFO), handlers=[handler], force=True)
    # Python warnings (torch's, numpy's) are printed raw on stderr; in JSON they must become
    # records too, or they are the one line a shipper cannot parse. Text keeps Python's own form.
    logging.captureWarnings(format_name == "json")
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
