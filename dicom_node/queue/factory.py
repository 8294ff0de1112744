"""Which job store engine to open: the embedded SQLite file in the data directory (the default, one
machine), or a PostgreSQL database that several nodes share (``[job_store] url``, issue 16)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import SecretStr

from dicom_node.config import mask_url
from dicom_node.logs import fields
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.queue.store import JobStore

log = logging.getLogger("dicom_node.jobs")


def open_job_store(db_path: Path, url: SecretStr | str | None = None) -> JobStore:
    """The node's job store: PostgreSQL at ``url`` (``[job_store] url``) when one is set, else the
    SQLite file ``db_path`` (``<data_dir>/jobs.sqlite3``). The URL is logged with its password masked."""
    secret = url.get_secret_value() if isinstance(url, SecretStr) else url
    if not secret:
        return SqliteJobStore(db_path)
    from dicom_node.queue.postgres_store import PostgresJobStore  # psycopg is loaded only by who needs it

    store = PostgresJobStore(secret)
    log.info(fields(event="job_store.opened", engine="postgresql", url=mask_url(secret)))
    return store
