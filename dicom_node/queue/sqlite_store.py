"""The embedded job store: one SQLite file in WAL mode, shared by the node and its worker processes.

WAL lets readers (the CLI, polling workers) run while one writer commits, and
``synchronous=FULL`` makes a commit durable when it returns: intake acknowledges a photo only after
that. Each thread uses its own connection (sqlite3 connections are not shared across threads);
each process opens its own store. Writes take ``BEGIN IMMEDIATE`` so a claim's read and update are
one atomic step across processes.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicom_node.queue.sql_store import INDEXES, SqlJobStore
from dicom_node.queue.store import JobStoreUnavailableError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another process's transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    calling_host TEXT NOT NULL,
    photo_path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    dispatch_attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL,
    owner TEXT,
    lease_until REAL,
    reason TEXT,
    rule TEXT,
    destinations TEXT NOT NULL DEFAULT '[]',
    parse_s REAL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    dispatching_since REAL,
    files_purged_at REAL,
    kind TEXT NOT NULL DEFAULT 'photo',
    source_uid TEXT,
    study_uid TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before, id);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner);
CREATE TABLE IF NOT EXISTS job_results (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
"""

# Each step takes a store from version N to N + 1 (index N - 1); run in one transaction at open.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1 -> 2: when dispatching began (the retry horizon), when the cleaner removed the files
    ("ALTER TABLE jobs ADD COLUMN dispatching_since REAL",
     "ALTER TABLE jobs ADD COLUMN files_purged_at REAL"),
    # 2 -> 3: lesion SEG jobs (issue 15): what a job was made from, a lesion job's photo, and the
    # photo's study (the %TBSA of a study combines its photos' lesions)
    ("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'photo'",
     "ALTER TABLE jobs ADD COLUMN source_uid TEXT",
     "ALTER TABLE jobs ADD COLUMN study_uid TEXT"),
)

class SqliteJobStore(SqlJobStore):
    """:class:`JobStore` on a SQLite file (created with its directory when missing)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        """``clock``: epoch seconds of every recorded change (injectable, so tests can let a week pass)."""
        self.path = Path(path)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has job store schema {row[0]}, newer than this version reads "
                                   f"({SCHEMA_VERSION}): run the newer dicom-node, or restore a backup")
            elif int(row[0]) < SCHEMA_VERSION:
                columns = {c[1] for c in db.execute("PRAGMA table_info(jobs)")}
                for version in range(int(row[0]), SCHEMA_VERSION):
                    for statement in _MIGRATIONS[version - 1]:
                        added = re.match(r"ALTER TABLE jobs ADD COLUMN (\w+)", statement)
                        if added is not None and added.group(1) in columns:
                            continue  # already there (a store downgraded by hand keeps later columns)
                        db.execute(statement)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                log.info("job store %s migrated from schema %s to %s", self.path, row[0], SCHEMA_VERSION)
            for statement in INDEXES:
                db.execute(statement)

    # ------------------------------------------------------------------ connections

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise sqlite3.ProgrammingError("the job store is closed")
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # durable at commit: intake acknowledges after it
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Threads of this process queue on a lock first: SQLite's own busy
        handler waits by sleeping with growing pauses, which made parallel intake slower than one
        association; other processes (workers) still meet SQLite's lock, briefly."""
        db = self._connection()
        with self._write_lock:
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:  # SQLite has already rolled back after some errors (disk full)
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:  # full, locked, I/O error: the machine's problem
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise JobStoreUnavailableError(f"job store {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for db in self._connections:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """Reads need no transaction: WAL shows each statement a committed state, and this thread's
        connection is its own."""
        yield self._connection()

    def _run(self, db: sqlite3.Connection, sql: str, args: Sequence[object] = ()) -> Any:
        return db.execute(sql, args)

    def _may_have_work(self, sql: str, args: Sequence[object]) -> bool:
        """A lock-free look first: polling workers and dispatchers must not take the write lock that
        intake needs to acknowledge a photo."""
        return self._connection().execute(sql, args).fetchone() is not None
