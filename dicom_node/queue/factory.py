"""Which job store engine to open. Today one: SQLite in the data directory (embedded default)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.queue.store import JobStore


def open_job_store(db_path: Path) -> JobStore:
    """The node's job store at ``db_path`` (``<data_dir>/jobs.sqlite3``)."""
    return SqliteJobStore(db_path)
