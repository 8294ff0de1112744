"""The embedded job store: one SQLite file in WAL mode, shared by the node and its worker processes.

WAL lets readers (the CLI, polling workers) run while one writer commits, and
``synchronous=FULL`` makes a commit durable when it returns: intake acknowledges a photo only after
that. Each thread uses its own connection (sqlite3 connections are not shared across threads);
each process opens its own store. Writes take ``BEGIN IMMEDIATE`` so a claim's read and update are
one atomic step across processes.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dicom_node.queue.job import (
    FINAL_STATES,
    PROCESSING_STATES,
    Job,
    JobEvent,
    JobKind,
    JobState,
    NewJob,
    ResultKind,
    ResultObject,
)
from dicom_node.queue.store import (
    MAX_ATTEMPTS,
    PROCESSING_LEASE_S,
    JobNotFoundError,
    JobStore,
    JobStoreUnavailableError,
    StaleJobError,
    lease_expired,
    takeover_reason,
)

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

_JOB_COLUMNS = (
    "id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, calling_ae, calling_host, photo_path, state, "
    "attempts, dispatch_attempts, not_before, owner, reason, destinations, rule, parse_s, received_at, updated_at, "
    "dispatching_since, files_purged_at, kind, source_uid, study_uid"
)

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
# After the schema and its migrations: an index on a column a migration may just have added.
_INDEXES = ("CREATE INDEX IF NOT EXISTS jobs_by_source ON jobs (source_uid) WHERE source_uid IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid) WHERE study_uid IS NOT NULL")

# A RECEIVED job may be claimed when it is a photo, or a lesion SEG whose photo has been parsed
# and still has its files: the photo's job reached DISPATCHING or DONE with a parse (parse_s set by
# finish_encoding; a photo no rule processes ends DONE without one) and retention has not purged it.
_RUNNABLE = (
    "(kind = 'photo' OR EXISTS (SELECT 1 FROM jobs AS photo WHERE photo.sop_instance_uid = jobs.source_uid "
    "AND photo.kind = 'photo' AND photo.state IN ('dispatching', 'done') AND photo.parse_s IS NOT NULL "
    "AND photo.files_purged_at IS NULL))"
)


class SqliteJobStore(JobStore):
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
        with self._write() as db:
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
            for statement in _INDEXES:
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
    def _write(self) -> Iterator[sqlite3.Connection]:
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

    # ------------------------------------------------------------------ rows

    def _job(self, db: sqlite3.Connection, row: tuple) -> Job:
        job_id = row[0]
        results = tuple(
            ResultObject(kind=ResultKind(r[0]), sop_class_uid=r[1], sop_instance_uid=r[2], transfer_syntax_uid=r[3],
                         path=r[4])
            for r in db.execute(
                "SELECT kind, sop_class_uid, sop_instance_uid, transfer_syntax_uid, path FROM job_results "
                "WHERE job_id = ? ORDER BY position",
                (job_id,),
            )
        )
        deliveries = frozenset(
            (r[0], r[1])
            for r in db.execute("SELECT destination, sop_instance_uid FROM deliveries WHERE job_id = ?", (job_id,))
        )
        return Job(
            id=job_id,
            sop_instance_uid=row[1],
            sop_class_uid=row[2],
            transfer_syntax_uid=row[3],
            calling_ae=row[4],
            calling_host=row[5],
            photo_path=row[6],
            state=JobState(row[7]),
            attempts=row[8],
            dispatch_attempts=row[9],
            not_before=row[10],
            owner=row[11],
            reason=row[12],
            destinations=tuple(json.loads(row[13])),
            rule=row[14],
            parse_s=row[15],
            received_at=row[16],
            updated_at=row[17],
            dispatching_since=row[18],
            files_purged_at=row[19],
            results=results,
            deliveries=deliveries,
            kind=JobKind(row[20]),
            source_uid=row[21],
            study_uid=row[22],
        )

    def _load(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return self._job(db, row)

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: int, at: float, from_state: JobState | None, to_state: JobState,
               reason: str | None) -> None:
        db.execute(
            "INSERT INTO job_events (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, at, from_state.value if from_state else None, to_state.value, reason),
        )

    def _owned(self, db: sqlite3.Connection, job_id: int, owner: str, states: Iterable[JobState]) -> Job:
        job = self._load(db, job_id)
        allowed = set(states)
        if job.owner != owner or job.state not in allowed:
            raise StaleJobError(
                f"job {job_id} is {job.state.value} held by {job.owner or 'nobody'}, not "
                f"{'/'.join(sorted(s.value for s in allowed))} held by {owner}"
            )
        return job

    def _move(self, db: sqlite3.Connection, job: Job, to_state: JobState, event_reason: str | None, now: float,
              **columns: object) -> Job:
        """Update one job's state and columns, write its history line, return the new record."""
        assignments = ["state = ?", "updated_at = ?"]
        values: list[object] = [to_state.value, now]
        for column, value in columns.items():
            assignments.append(f"{column} = ?")
            values.append(value)
        db.execute(f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?", (*values, job.id))
        self._event(db, job.id, now, job.state, to_state, event_reason)
        return self._load(db, job.id)

    # ------------------------------------------------------------------ intake

    def add_received(self, new: NewJob) -> tuple[Job, bool]:
        now = self._clock()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, transfer_syntax_uid, calling_ae, calling_host, "
                "photo_path, state, received_at, updated_at, kind, source_uid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid) DO NOTHING",
                (new.sop_instance_uid, new.sop_class_uid, new.transfer_syntax_uid, new.calling_ae, new.calling_host,
                 new.photo_path, JobState.RECEIVED.value, now, now, JobKind(new.kind).value, new.source_uid),
            )
            created = cursor.rowcount == 1
            if created:
                assert cursor.lastrowid is not None  # an INSERT that added a row has its rowid
                job_id = cursor.lastrowid
                self._event(db, job_id, now, None, JobState.RECEIVED, None)
                job = self._load(db, job_id)
            else:
                row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE sop_instance_uid = ?",
                                 (new.sop_instance_uid,)).fetchone()
                job = self._job(db, row)
        if created:
            self.log_transition(job, None, None)
        return job, created

    # ------------------------------------------------------------------ reading

    def get(self, job_id: int) -> Job:
        return self._load(self._connection(), int(job_id))

    def find(self, sop_instance_uid: str) -> Job | None:
        db = self._connection()
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE sop_instance_uid = ?",
                         (sop_instance_uid,)).fetchone()
        return self._job(db, row) if row else None

    def list_jobs(self, states: Iterable[JobState] | None = None, limit: int = 100) -> list[Job]:
        db = self._connection()
        if states is None:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        else:
            wanted = [JobState(s).value for s in states]
            marks = ", ".join("?" for _ in wanted)
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?",
                (*wanted, limit),
            ).fetchall()
        return [self._job(db, row) for row in rows]

    def history(self, job_id: int) -> list[JobEvent]:
        rows = self._connection().execute(
            "SELECT job_id, at, from_state, to_state, reason FROM job_events WHERE job_id = ? ORDER BY id",
            (job_id,),
        ).fetchall()
        return [JobEvent(r[0], r[1], JobState(r[2]) if r[2] else None, JobState(r[3]), r[4]) for r in rows]

    def counts(self) -> dict[JobState, int]:
        out = {state: 0 for state in JobState}
        for state, count in self._connection().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[JobState(state)] = count
        return out

    # ------------------------------------------------------------------ processing

    def claim_for_processing(self, owner: str, now: float | None = None, lease_s: float = PROCESSING_LEASE_S,
                             max_attempts: int = MAX_ATTEMPTS) -> Job | None:
        now = self._clock() if now is None else now
        query = (f"SELECT id FROM jobs WHERE (state = ? AND (not_before IS NULL OR not_before <= ?) AND {_RUNNABLE}) "
                 "OR (state IN (?, ?) AND lease_until < ?) ORDER BY id LIMIT 1")
        args = (JobState.RECEIVED.value, now, JobState.PARSING.value, JobState.ENCODING.value, now)
        # A lock-free look first: polling workers must not take the write lock intake needs.
        if self._connection().execute(query, args).fetchone() is None:
            return None
        transitions: list[tuple[Job, JobState, str | None]] = []
        claimed: Job | None = None
        with self._write() as db:
            while claimed is None:
                row = db.execute(query, args).fetchone()
                if row is None:
                    break
                job = self._load(db, row[0])
                if job.state != JobState.RECEIVED:  # its holder's lease ran out: presumed dead
                    previous, why = job.state, takeover_reason(job.owner, owner)
                    if job.attempts >= max_attempts:
                        why = f"{lease_expired(job.owner)}; gave up after {job.attempts} attempts"
                        job = self._move(db, job, JobState.FAILED, why, now, owner=None, lease_until=None, reason=why)
                        transitions.append((job, previous, why))
                        continue
                    job = self._move(db, job, JobState.RECEIVED, why, now, owner=None, lease_until=None, reason=why)
                    transitions.append((job, previous, why))
                claimed = self._move(db, job, JobState.PARSING, None, now, owner=owner, attempts=job.attempts + 1,
                                     not_before=None, lease_until=now + lease_s, reason=None)
                transitions.append((claimed, JobState.RECEIVED, None))
        for moved, from_state, note in transitions:
            self.log_transition(moved, from_state, note)
        return claimed

    def renew_lease(self, job_id: int, owner: str, lease_s: float, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        with self._write() as db:
            self._owned(db, job_id, owner, PROCESSING_STATES)
            db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (now + lease_s, job_id))
        return now + lease_s

    def set_route(self, job_id: int, owner: str, rule: str | None, destinations: Sequence[str],
                  study_uid: str | None = None) -> Job:
        with self._write() as db:
            self._owned(db, job_id, owner, PROCESSING_STATES)
            db.execute("UPDATE jobs SET rule = ?, destinations = ?, study_uid = COALESCE(?, study_uid), "
                       "updated_at = ? WHERE id = ?",
                       (rule, json.dumps(list(destinations)), study_uid, self._clock(), job_id))
            return self._load(db, job_id)

    def advance(self, job_id: int, owner: str, to_state: JobState, reason: str | None = None) -> Job:
        if to_state not in (JobState.ENCODING, JobState.DONE):
            raise ValueError(f"advance() moves to encoding or done, not {to_state.value}")
        now = self._clock()
        with self._write() as db:
            job = self._owned(db, job_id, owner, PROCESSING_STATES)
            previous = job.state
            release = {"owner": None, "lease_until": None} if to_state == JobState.DONE else {}
            job = self._move(db, job, to_state, reason, now, reason=reason, **release)
        self.log_transition(job, previous, reason)
        return job

    def finish_encoding(self, job_id: int, owner: str, results: Sequence[ResultObject],
                        parse_s: float | None) -> Job:
        now = self._clock()
        with self._write() as db:
            job = self._owned(db, job_id, owner, {JobState.ENCODING})
            db.execute("DELETE FROM job_results WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            for position, result in enumerate(results):
                db.execute(
                    "INSERT INTO job_results (job_id, kind, sop_class_uid, sop_instance_uid, transfer_syntax_uid, "
                    "path, position) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, result.kind, result.sop_class_uid, result.sop_instance_uid, result.transfer_syntax_uid,
                     result.path, position),
                )
            job = self._move(db, job, JobState.DISPATCHING, None, now, owner=None, lease_until=None,
                             not_before=None, dispatch_attempts=0, parse_s=parse_s, reason=None,
                             dispatching_since=now)
        self.log_transition(job, JobState.ENCODING, None)
        return job

    def requeue(self, job_id: int, owner: str, reason: str, not_before: float | None = None) -> Job:
        now = self._clock()
        with self._write() as db:
            job = self._owned(db, job_id, owner, PROCESSING_STATES)
            previous = job.state
            job = self._move(db, job, JobState.RECEIVED, reason, now, owner=None, lease_until=None,
                             not_before=not_before, reason=reason)
        self.log_transition(job, previous, reason)
        return job

    def fail(self, job_id: int, reason: str, owner: str | None = None) -> Job:
        now = self._clock()
        with self._write() as db:
            job = self._load(db, job_id)
            if owner is not None:
                job = self._owned(db, job_id, owner, set(JobState) - {JobState.DONE, JobState.FAILED})
            previous = job.state
            job = self._move(db, job, JobState.FAILED, reason, now, owner=None, lease_until=None, reason=reason)
        self.log_transition(job, previous, reason)
        return job

    # ------------------------------------------------------------------ dispatch

    def claim_for_dispatch(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        now = self._clock() if now is None else now
        query = ("SELECT id FROM jobs WHERE state = ? AND (not_before IS NULL OR not_before <= ?) "
                 "AND (owner IS NULL OR lease_until IS NULL OR lease_until < ?) ORDER BY id LIMIT 1")
        args = (JobState.DISPATCHING.value, now, now)
        if self._connection().execute(query, args).fetchone() is None:
            return None
        with self._write() as db:
            row = db.execute(query, args).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ?", (owner, now + lease_s, row[0]))
            return self._load(db, row[0])

    def record_delivery(self, job_id: int, owner: str, destination: str, sop_instance_uid: str) -> None:
        with self._write() as db:
            self._owned(db, job_id, owner, {JobState.DISPATCHING})
            db.execute(
                "INSERT OR IGNORE INTO deliveries (job_id, destination, sop_instance_uid, delivered_at) "
                "VALUES (?, ?, ?, ?)",
                (job_id, destination, sop_instance_uid, self._clock()),
            )

    def dispatch_succeeded(self, job_id: int, owner: str) -> Job:
        now = self._clock()
        with self._write() as db:
            job = self._owned(db, job_id, owner, {JobState.DISPATCHING})
            job = self._move(db, job, JobState.DONE, None, now, owner=None, lease_until=None, not_before=None,
                             reason=None)
        self.log_transition(job, JobState.DISPATCHING, None)
        return job

    def dispatch_failed(self, job_id: int, owner: str, reason: str, retry_at: float | None) -> Job:
        now = self._clock()
        with self._write() as db:
            job = self._owned(db, job_id, owner, {JobState.DISPATCHING})
            to_state = JobState.DISPATCHING if retry_at is not None else JobState.FAILED
            job = self._move(db, job, to_state, reason, now, owner=None, lease_until=None, not_before=retry_at,
                             dispatch_attempts=job.dispatch_attempts + 1, reason=reason)
        self.log_transition(job, JobState.DISPATCHING, reason)
        return job

    # ------------------------------------------------------------------ recovery and people

    def release_owner(self, owner_prefix: str, reason: str, max_attempts: int, charge: bool = True) -> list[Job]:
        now = self._clock()
        released: list[tuple[Job, JobState, str]] = []
        pattern = owner_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._write() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner LIKE ? ESCAPE '\\' ORDER BY id",
                              (pattern,)).fetchall()
            for row in rows:
                job = self._job(db, row)
                previous = job.state
                if job.state in PROCESSING_STATES:
                    if not charge:  # the claim counted this attempt; it was not the photo's doing
                        why = f"{reason}; will continue (not counted as an attempt)"
                        job = self._move(db, job, JobState.RECEIVED, why, now, owner=None, lease_until=None, reason=why,
                                         attempts=max(0, job.attempts - 1))
                    elif job.attempts >= max_attempts:
                        why = f"{reason}; gave up after {job.attempts} attempts"
                        job = self._move(db, job, JobState.FAILED, why, now, owner=None, lease_until=None, reason=why)
                    else:
                        why = f"{reason}; will try again (attempt {job.attempts} of {max_attempts} was cut short)"
                        job = self._move(db, job, JobState.RECEIVED, why, now, owner=None, lease_until=None, reason=why)
                    released.append((job, previous, why))
                elif job.state == JobState.DISPATCHING:
                    db.execute("UPDATE jobs SET owner = NULL, lease_until = NULL WHERE id = ?", (job.id,))
                else:  # a final state never keeps an owner; clear a stray one
                    db.execute("UPDATE jobs SET owner = NULL, lease_until = NULL WHERE id = ?", (job.id,))
        for job, previous, why in released:
            self.log_transition(job, previous, why)
        return [job for job, _, _ in released]

    def held_jobs(self, owner_prefix: str, states: Iterable[JobState] | None = None) -> list[Job]:
        db = self._connection()
        pattern = owner_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner LIKE ? ESCAPE '\\'"
        args: list[object] = [pattern]
        if states is not None:
            wanted = [JobState(s).value for s in states]
            query += f" AND state IN ({', '.join('?' for _ in wanted)})"
            args += wanted
        return [self._job(db, row) for row in db.execute(query + " ORDER BY id", args).fetchall()]

    def retry(self, job_id: int, reason: str = "retried by hand") -> Job:
        now = self._clock()
        with self._write() as db:
            job = self._load(db, job_id)
            if job.state != JobState.FAILED:
                raise StaleJobError(f"job {job_id} is {job.state.value}; only failed jobs can be retried")
            if job.files_purged_at is not None:
                raise StaleJobError(self.files_purged_message(job))
            if job.results:
                job = self._move(db, job, JobState.DISPATCHING, reason, now, owner=None, lease_until=None,
                                 not_before=None, dispatch_attempts=0, reason=reason, dispatching_since=now)
            else:
                job = self._move(db, job, JobState.RECEIVED, reason, now, owner=None, lease_until=None,
                                 not_before=None, attempts=0, reason=reason)
        self.log_transition(job, JobState.FAILED, reason)
        return job

    # ------------------------------------------------------------------ lesion jobs

    def waiting_lesion_jobs(self, waiting_since_before: float | None = None) -> list[Job]:
        db = self._connection()
        query = (f"SELECT {_JOB_COLUMNS} FROM jobs WHERE kind = ? AND state = ? AND NOT {_RUNNABLE}")
        args: list[object] = [JobKind.LESION.value, JobState.RECEIVED.value]
        if waiting_since_before is not None:
            query += " AND updated_at <= ?"
            args.append(waiting_since_before)
        return [self._job(db, row) for row in db.execute(query + " ORDER BY id", args).fetchall()]

    def study_lesion_jobs(self, study_uid: str) -> list[Job]:
        db = self._connection()
        query = (f"SELECT {_JOB_COLUMNS} FROM jobs WHERE kind = ? AND state IN (?, ?) AND files_purged_at IS NULL "
                 "AND source_uid IN (SELECT sop_instance_uid FROM jobs AS photo WHERE photo.kind = 'photo' "
                 "AND photo.study_uid = ? AND photo.files_purged_at IS NULL) ORDER BY id")
        args = (JobKind.LESION.value, JobState.DISPATCHING.value, JobState.DONE.value, study_uid)
        return [self._job(db, row) for row in db.execute(query, args).fetchall()]

    def fail_waiting(self, job_id: int, waiting_since_before: float, reason: str) -> Job | None:
        now = self._clock()
        with self._write() as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND kind = ? AND state = ? "
                             f"AND updated_at <= ? AND NOT {_RUNNABLE}",
                             (job_id, JobKind.LESION.value, JobState.RECEIVED.value, waiting_since_before)).fetchone()
            if row is None:
                return None
            job = self._move(db, self._job(db, row), JobState.FAILED, reason, now, owner=None, lease_until=None,
                             reason=reason)
        self.log_transition(job, JobState.RECEIVED, reason)
        return job

    # ------------------------------------------------------------------ retention

    def jobs_with_files(self, states: Iterable[JobState] | None = None, ended_before: float | None = None,
                        limit: int | None = None) -> list[Job]:
        where = ["files_purged_at IS NULL"]
        args: list[object] = []
        if states is not None:
            wanted = [JobState(s).value for s in states]
            where.append(f"state IN ({', '.join('?' for _ in wanted)})")
            args += wanted
        if ended_before is not None:
            where.append("updated_at <= ?")
            args.append(ended_before)
        args.append(-1 if limit is None else limit)
        db = self._connection()
        rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                          "ORDER BY updated_at, id LIMIT ?", args).fetchall()
        return [self._job(db, row) for row in rows]

    def mark_files_purged(self, job_id: int, ended_before: float, note: str) -> Job | None:
        now = self._clock()
        with self._write() as db:
            job = self._load(db, job_id)
            if job.state not in FINAL_STATES or job.files_purged_at is not None or job.updated_at > ended_before:
                return None
            # updated_at stays: it is when the job ended, which its record's own retention counts from
            db.execute("UPDATE jobs SET files_purged_at = ? WHERE id = ?", (now, job_id))
            self._event(db, job_id, now, job.state, job.state, note)
            return self._load(db, job_id)

    def forget_jobs(self, ended_before: float, limit: int = 500) -> list[int]:
        finals = [s.value for s in FINAL_STATES]
        with self._write() as db:
            ids = [row[0] for row in db.execute(
                f"SELECT id FROM jobs WHERE state IN ({', '.join('?' for _ in finals)}) "
                "AND files_purged_at IS NOT NULL AND updated_at <= ? ORDER BY updated_at, id LIMIT ?",
                (*finals, ended_before, limit))]
            for table in ("deliveries", "job_results", "job_events"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        return ids
