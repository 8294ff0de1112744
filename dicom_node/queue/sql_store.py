"""What the SQL job stores share: every transition of a job, written once for SQLite and PostgreSQL.

The two engines (:mod:`~dicom_node.queue.sqlite_store`, :mod:`~dicom_node.queue.postgres_store`)
keep the same tables and columns, so a job's life is the same statements on either: a transition
reads the job, checks who holds it, updates it and writes its history line in one transaction.
Written twice, the two copies drifted (a branch one engine had and the other not). Here each
transition is written once, in SQL both understand (``?`` placeholders, ``IN (...)`` lists,
``ON CONFLICT DO NOTHING``, ``RETURNING``: SQLite 3.35 or later), and an engine supplies only what
really differs:

* its connections and transactions (:meth:`SqlJobStore._transaction` for a write,
  :meth:`SqlJobStore._reading` for a read) and how a statement is run (:meth:`SqlJobStore._run`:
  PostgreSQL's driver takes ``%s`` where SQLite's takes ``?``);
* row locks: PostgreSQL locks each job it reads before writing it (``FOR UPDATE``) and lets a
  claimer pass over a job another is taking (``SKIP LOCKED``); SQLite's ``BEGIN IMMEDIATE``
  already orders every write, so ``_LOCK`` and ``_SKIP_LOCKED`` are empty there;
* whether an idle claimer may look before it takes the write lock (SQLite: intake needs that lock);
* what other nodes are told when work for another stage is committed (PostgreSQL's ``NOTIFY``).

The schema and its migrations stay with each engine (types and DDL differ).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

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
    StaleJobError,
    lease_expired,
    takeover_reason,
)

JOB_COLUMNS = (
    "id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, calling_ae, calling_host, photo_path, state, "
    "attempts, dispatch_attempts, not_before, owner, reason, destinations, rule, parse_s, received_at, updated_at, "
    "dispatching_since, files_purged_at, kind, source_uid, study_uid"
)

# After each engine's schema and its migrations: indexes on columns a migration may just have added.
INDEXES = ("CREATE INDEX IF NOT EXISTS jobs_by_source ON jobs (source_uid) WHERE source_uid IS NOT NULL",
           "CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid) WHERE study_uid IS NOT NULL")

# A RECEIVED job may be claimed when it is a photo, or a lesion SEG whose photo has been parsed
# and still has its files: the photo's job reached DISPATCHING or DONE with a parse (parse_s set by
# finish_encoding; a photo no rule processes ends DONE without one) and retention has not purged it.
RUNNABLE = (
    "(kind = 'photo' OR EXISTS (SELECT 1 FROM jobs AS photo WHERE photo.sop_instance_uid = jobs.source_uid "
    "AND photo.kind = 'photo' AND photo.state IN ('dispatching', 'done') AND photo.parse_s IS NOT NULL "
    "AND photo.files_purged_at IS NULL))"
)

_ROWS_PER_QUERY = 500  # ids in one IN (...) list: well below SQLite's limit on bound parameters


def marks(values: Sequence[object]) -> str:
    """``?, ?, ...`` for an ``IN (...)`` list of ``values`` (at least one)."""
    return ", ".join("?" for _ in values)


def like_prefix(prefix: str) -> str:
    """A LIKE pattern (with ``ESCAPE '\\'``) matching what starts with ``prefix``, its own % and _
    taken literally."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _to_job(row: Sequence[Any], results: tuple[ResultObject, ...], deliveries: frozenset[tuple[str, str]]) -> Job:
    """A row of ``JOB_COLUMNS`` with its results and deliveries as a :class:`Job`."""
    return Job(
        id=row[0], sop_instance_uid=row[1], sop_class_uid=row[2], transfer_syntax_uid=row[3], calling_ae=row[4],
        calling_host=row[5], photo_path=row[6], state=JobState(row[7]), attempts=row[8], dispatch_attempts=row[9],
        not_before=row[10], owner=row[11], reason=row[12], destinations=tuple(json.loads(row[13])), rule=row[14],
        parse_s=row[15], received_at=row[16], updated_at=row[17], dispatching_since=row[18],
        files_purged_at=row[19], results=results, deliveries=deliveries, kind=JobKind(row[20]),
        source_uid=row[21], study_uid=row[22],
    )


class SqlJobStore(JobStore):
    """:class:`JobStore` on the shared tables; an engine subclasses it with its connections."""

    _LOCK = ""  # appended to a read that precedes a write of the same rows
    _SKIP_LOCKED = ""  # appended to a claim's search: pass over rows another transaction holds
    _clock: Callable[[], float]

    # ------------------------------------------------------------------ what an engine provides

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Any]:
        """One write transaction (a connection): committed when the block ends, rolled back when it
        raises; the machine's failures raise :class:`~dicom_node.queue.store.JobStoreUnavailableError`."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Any]:
        """A connection for reads that write nothing."""

    @abstractmethod
    def _run(self, db: Any, sql: str, args: Sequence[object] = ()) -> Any:
        """Run one statement written with ``?`` placeholders; returns the cursor."""

    def _may_have_work(self, sql: str, args: Sequence[object]) -> bool:
        """Before a claim takes the write lock: could ``sql`` find a row? True: look in the transaction."""
        return True

    def _received(self, db: Any) -> None:
        """In the transaction that committed a new job (tell other nodes' workers)."""

    def _results_ready(self, db: Any) -> None:
        """In the transaction that committed a job's results (tell other nodes' dispatchers)."""

    # ------------------------------------------------------------------ rows

    def _jobs(self, db: Any, rows: Sequence[Sequence[Any]]) -> list[Job]:
        """Rows of ``JOB_COLUMNS`` as jobs, their results and deliveries read in two queries per 500."""
        results: dict[int, list[ResultObject]] = {row[0]: [] for row in rows}
        deliveries: dict[int, set[tuple[str, str]]] = {row[0]: set() for row in rows}
        ids = list(results)
        for start in range(0, len(ids), _ROWS_PER_QUERY):
            chunk = ids[start:start + _ROWS_PER_QUERY]
            for r in self._run(db, "SELECT job_id, kind, sop_class_uid, sop_instance_uid, transfer_syntax_uid, path "
                                   f"FROM job_results WHERE job_id IN ({marks(chunk)}) ORDER BY job_id, position",
                               chunk):
                results[r[0]].append(ResultObject(kind=ResultKind(r[1]), sop_class_uid=r[2], sop_instance_uid=r[3],
                                                  transfer_syntax_uid=r[4], path=r[5]))
            for r in self._run(db, "SELECT job_id, destination, sop_instance_uid FROM deliveries "
                                   f"WHERE job_id IN ({marks(chunk)})", chunk):
                deliveries[r[0]].add((r[1], r[2]))
        return [_to_job(row, tuple(results[row[0]]), frozenset(deliveries[row[0]])) for row in rows]

    def _select(self, db: Any, where: str, args: Sequence[object] = (), tail: str = "",
                lock: bool = False) -> list[Job]:
        """Jobs ``WHERE where`` (``tail``: ORDER BY, LIMIT); ``lock``: held until the transaction ends."""
        rows = self._run(db, f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} {tail}{self._LOCK if lock else ''}",
                         args).fetchall()
        return self._jobs(db, rows)

    def _load(self, db: Any, job_id: int, lock: bool = False) -> Job:
        """One job; ``lock``: hold its row until the transaction ends (every read before a write)."""
        found = self._select(db, "id = ?", (job_id,), lock=lock)
        if not found:
            raise JobNotFoundError(job_id)
        return found[0]

    def _event(self, db: Any, job_id: int, at: float, from_state: JobState | None, to_state: JobState,
               reason: str | None) -> None:
        self._run(db, "INSERT INTO job_events (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                  (job_id, at, from_state.value if from_state else None, to_state.value, reason))

    def _owned(self, db: Any, job_id: int, owner: str, states: Iterable[JobState]) -> Job:
        """The job, locked, when ``owner`` holds it in one of ``states``; else :class:`StaleJobError`."""
        job = self._load(db, job_id, lock=True)
        allowed = set(states)
        if job.owner != owner or job.state not in allowed:
            raise StaleJobError(
                f"job {job_id} is {job.state.value} held by {job.owner or 'nobody'}, not "
                f"{'/'.join(sorted(s.value for s in allowed))} held by {owner}"
            )
        return job

    def _move(self, db: Any, job: Job, to_state: JobState, event_reason: str | None, now: float,
              **columns: object) -> Job:
        """Update one (locked) job's state and columns, write its history line, return the new record."""
        assignments = ["state = ?", "updated_at = ?"]
        values: list[object] = [to_state.value, now]
        for column, value in columns.items():
            assignments.append(f"{column} = ?")
            values.append(value)
        self._run(db, f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?", (*values, job.id))
        self._event(db, job.id, now, job.state, to_state, event_reason)
        return self._load(db, job.id)

    # ------------------------------------------------------------------ intake

    def add_received(self, new: NewJob) -> tuple[Job, bool]:
        now = self._clock()
        with self._transaction() as db:
            # A second node receiving the same SOP Instance waits on the unique index for the first
            # one's commit (PostgreSQL; SQLite's writers are one at a time), then reads that job.
            # fetchall: a statement with RETURNING is finished only once its rows are read (SQLite)
            returned = self._run(
                db,
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, transfer_syntax_uid, calling_ae, calling_host, "
                "photo_path, state, received_at, updated_at, kind, source_uid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id",
                (new.sop_instance_uid, new.sop_class_uid, new.transfer_syntax_uid, new.calling_ae, new.calling_host,
                 new.photo_path, JobState.RECEIVED.value, now, now, JobKind(new.kind).value, new.source_uid),
            ).fetchall()
            inserted = returned[0] if returned else None
            if inserted is not None:
                self._event(db, inserted[0], now, None, JobState.RECEIVED, None)
                self._received(db)
                job = self._load(db, inserted[0])
            else:
                (job,) = self._select(db, "sop_instance_uid = ?", (new.sop_instance_uid,))
        if inserted is not None:
            self.log_transition(job, None, None)
        return job, inserted is not None

    # ------------------------------------------------------------------ reading

    def get(self, job_id: int) -> Job:
        with self._reading() as db:
            return self._load(db, int(job_id))

    def find(self, sop_instance_uid: str) -> Job | None:
        with self._reading() as db:
            found = self._select(db, "sop_instance_uid = ?", (sop_instance_uid,))
        return found[0] if found else None

    def list_jobs(self, states: Iterable[JobState] | None = None, limit: int = 100) -> list[Job]:
        with self._reading() as db:
            if states is None:
                return self._select(db, "1 = 1", (limit,), "ORDER BY id DESC LIMIT ?")
            wanted = [JobState(s).value for s in states]
            if not wanted:
                return []
            return self._select(db, f"state IN ({marks(wanted)})", (*wanted, limit), "ORDER BY id DESC LIMIT ?")

    def history(self, job_id: int) -> list[JobEvent]:
        with self._reading() as db:
            rows = self._run(db, "SELECT job_id, at, from_state, to_state, reason FROM job_events WHERE job_id = ? "
                                 "ORDER BY id", (job_id,)).fetchall()
        return [JobEvent(r[0], r[1], JobState(r[2]) if r[2] else None, JobState(r[3]), r[4]) for r in rows]

    def counts(self) -> dict[JobState, int]:
        out = {state: 0 for state in JobState}
        with self._reading() as db:
            for state, count in self._run(db, "SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall():
                out[JobState(state)] = count
        return out

    # ------------------------------------------------------------------ processing

    def claim_for_processing(self, owner: str, now: float | None = None, lease_s: float = PROCESSING_LEASE_S,
                             max_attempts: int = MAX_ATTEMPTS) -> Job | None:
        now = self._clock() if now is None else now
        # SKIP LOCKED (PostgreSQL): a job another node is claiming, or whose holder is renewing its
        # lease right now, is passed over; the holder's renewal and a take-over never both land.
        search = (f"SELECT id FROM jobs WHERE (state = ? AND (not_before IS NULL OR not_before <= ?) AND {RUNNABLE}) "
                  f"OR (state IN (?, ?) AND lease_until < ?) ORDER BY id LIMIT 1{self._SKIP_LOCKED}")
        args = (JobState.RECEIVED.value, now, JobState.PARSING.value, JobState.ENCODING.value, now)
        if not self._may_have_work(search, args):
            return None
        transitions: list[tuple[Job, JobState, str | None]] = []
        claimed: Job | None = None
        with self._transaction() as db:
            while claimed is None:
                row = self._run(db, search, args).fetchone()
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
        with self._transaction() as db:
            self._owned(db, job_id, owner, PROCESSING_STATES)
            self._run(db, "UPDATE jobs SET lease_until = ? WHERE id = ?", (now + lease_s, job_id))
        return now + lease_s

    def set_route(self, job_id: int, owner: str, rule: str | None, destinations: Sequence[str],
                  study_uid: str | None = None) -> Job:
        with self._transaction() as db:
            self._owned(db, job_id, owner, PROCESSING_STATES)
            self._run(db, "UPDATE jobs SET rule = ?, destinations = ?, study_uid = COALESCE(?, study_uid), "
                          "updated_at = ? WHERE id = ?",
                      (rule, json.dumps(list(destinations)), study_uid, self._clock(), job_id))
            return self._load(db, job_id)

    def advance(self, job_id: int, owner: str, to_state: JobState, reason: str | None = None) -> Job:
        if to_state not in (JobState.ENCODING, JobState.DONE):
            raise ValueError(f"advance() moves to encoding or done, not {to_state.value}")
        now = self._clock()
        with self._transaction() as db:
            job = self._owned(db, job_id, owner, PROCESSING_STATES)
            previous = job.state
            release = {"owner": None, "lease_until": None} if to_state == JobState.DONE else {}
            job = self._move(db, job, to_state, reason, now, reason=reason, **release)
        self.log_transition(job, previous, reason)
        return job

    def finish_encoding(self, job_id: int, owner: str, results: Sequence[ResultObject],
                        parse_s: float | None) -> Job:
        now = self._clock()
        with self._transaction() as db:
            job = self._owned(db, job_id, owner, {JobState.ENCODING})
            self._run(db, "DELETE FROM job_results WHERE job_id = ?", (job_id,))
            self._run(db, "DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            for position, result in enumerate(results):
                self._run(db, "INSERT INTO job_results (job_id, kind, sop_class_uid, sop_instance_uid, "
                              "transfer_syntax_uid, path, position) VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (job_id, ResultKind(result.kind).value, result.sop_class_uid, result.sop_instance_uid,
                           result.transfer_syntax_uid, result.path, position))
            job = self._move(db, job, JobState.DISPATCHING, None, now, owner=None, lease_until=None,
                             not_before=None, dispatch_attempts=0, parse_s=parse_s, reason=None,
                             dispatching_since=now)
            self._results_ready(db)
        self.log_transition(job, JobState.ENCODING, None)
        return job

    def requeue(self, job_id: int, owner: str, reason: str, not_before: float | None = None) -> Job:
        now = self._clock()
        with self._transaction() as db:
            job = self._owned(db, job_id, owner, PROCESSING_STATES)
            previous = job.state
            job = self._move(db, job, JobState.RECEIVED, reason, now, owner=None, lease_until=None,
                             not_before=not_before, reason=reason)
        self.log_transition(job, previous, reason)
        return job

    def fail(self, job_id: int, reason: str, owner: str | None = None) -> Job:
        now = self._clock()
        with self._transaction() as db:
            job = self._load(db, job_id, lock=True)
            if owner is not None:
                job = self._owned(db, job_id, owner, set(JobState) - {JobState.DONE, JobState.FAILED})
            previous = job.state
            job = self._move(db, job, JobState.FAILED, reason, now, owner=None, lease_until=None, reason=reason)
        self.log_transition(job, previous, reason)
        return job

    # ------------------------------------------------------------------ dispatch

    def claim_for_dispatch(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        now = self._clock() if now is None else now
        search = ("SELECT id FROM jobs WHERE state = ? AND (not_before IS NULL OR not_before <= ?) "
                  "AND (owner IS NULL OR lease_until IS NULL OR lease_until < ?) "
                  f"ORDER BY id LIMIT 1{self._SKIP_LOCKED}")
        args = (JobState.DISPATCHING.value, now, now)
        if not self._may_have_work(search, args):
            return None
        with self._transaction() as db:
            row = self._run(db, search, args).fetchone()
            if row is None:
                return None
            self._run(db, "UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ?", (owner, now + lease_s, row[0]))
            return self._load(db, row[0])

    def record_delivery(self, job_id: int, owner: str, destination: str, sop_instance_uid: str) -> None:
        with self._transaction() as db:
            self._owned(db, job_id, owner, {JobState.DISPATCHING})
            self._run(db, "INSERT INTO deliveries (job_id, destination, sop_instance_uid, delivered_at) "
                          "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (job_id, destination, sop_instance_uid, self._clock()))

    def dispatch_succeeded(self, job_id: int, owner: str) -> Job:
        now = self._clock()
        with self._transaction() as db:
            job = self._owned(db, job_id, owner, {JobState.DISPATCHING})
            job = self._move(db, job, JobState.DONE, None, now, owner=None, lease_until=None, not_before=None,
                             reason=None)
        self.log_transition(job, JobState.DISPATCHING, None)
        return job

    def dispatch_failed(self, job_id: int, owner: str, reason: str, retry_at: float | None) -> Job:
        now = self._clock()
        with self._transaction() as db:
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
        with self._transaction() as db:
            for job in self._select(db, "owner LIKE ? ESCAPE '\\'", (like_prefix(owner_prefix),), "ORDER BY id",
                                    lock=True):
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
                else:  # a dispatch lease is dropped (due when it was); a final state never keeps an owner
                    self._run(db, "UPDATE jobs SET owner = NULL, lease_until = NULL WHERE id = ?", (job.id,))
        for job, previous, why in released:
            self.log_transition(job, previous, why)
        return [job for job, _, _ in released]

    def held_jobs(self, owner_prefix: str, states: Iterable[JobState] | None = None) -> list[Job]:
        where = "owner LIKE ? ESCAPE '\\'"
        args: list[object] = [like_prefix(owner_prefix)]
        if states is not None:
            wanted = [JobState(s).value for s in states]
            if not wanted:
                return []
            where += f" AND state IN ({marks(wanted)})"
            args += wanted
        with self._reading() as db:
            return self._select(db, where, args, "ORDER BY id")

    def retry(self, job_id: int, reason: str = "retried by hand") -> Job:
        now = self._clock()
        with self._transaction() as db:
            job = self._load(db, job_id, lock=True)
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
        where = f"kind = ? AND state = ? AND NOT {RUNNABLE}"
        args: list[object] = [JobKind.LESION.value, JobState.RECEIVED.value]
        if waiting_since_before is not None:
            where += " AND updated_at <= ?"
            args.append(waiting_since_before)
        with self._reading() as db:
            return self._select(db, where, args, "ORDER BY id")

    def study_lesion_jobs(self, study_uid: str) -> list[Job]:
        where = ("kind = ? AND state IN (?, ?) AND files_purged_at IS NULL "
                 "AND source_uid IN (SELECT sop_instance_uid FROM jobs AS photo WHERE photo.kind = 'photo' "
                 "AND photo.study_uid = ? AND photo.files_purged_at IS NULL)")
        args = (JobKind.LESION.value, JobState.DISPATCHING.value, JobState.DONE.value, study_uid)
        with self._reading() as db:
            return self._select(db, where, args, "ORDER BY id")

    def fail_waiting(self, job_id: int, waiting_since_before: float, reason: str) -> Job | None:
        now = self._clock()
        with self._transaction() as db:
            # Locked (PostgreSQL), and re-checked once a claim holding it commits: a lesion job
            # claimed meanwhile (no longer RECEIVED) is not failed.
            found = self._select(db, f"id = ? AND kind = ? AND state = ? AND updated_at <= ? AND NOT {RUNNABLE}",
                                 (job_id, JobKind.LESION.value, JobState.RECEIVED.value, waiting_since_before),
                                 lock=True)
            if not found:
                return None
            job = self._move(db, found[0], JobState.FAILED, reason, now, owner=None, lease_until=None, reason=reason)
        self.log_transition(job, JobState.RECEIVED, reason)
        return job

    # ------------------------------------------------------------------ retention

    def jobs_with_files(self, states: Iterable[JobState] | None = None, ended_before: float | None = None,
                        limit: int | None = None) -> list[Job]:
        where = ["files_purged_at IS NULL"]
        args: list[object] = []
        if states is not None:
            wanted = [JobState(s).value for s in states]
            if not wanted:
                return []
            where.append(f"state IN ({marks(wanted)})")
            args += wanted
        if ended_before is not None:
            where.append("updated_at <= ?")
            args.append(ended_before)
        tail = "ORDER BY updated_at, id"
        if limit is not None:
            tail += " LIMIT ?"
            args.append(limit)
        with self._reading() as db:
            return self._select(db, " AND ".join(where), args, tail)

    def mark_files_purged(self, job_id: int, ended_before: float, note: str) -> Job | None:
        now = self._clock()
        with self._transaction() as db:
            job = self._load(db, job_id, lock=True)
            if job.state not in FINAL_STATES or job.files_purged_at is not None or job.updated_at > ended_before:
                return None
            # updated_at stays: it is when the job ended, which its record's own retention counts from
            self._run(db, "UPDATE jobs SET files_purged_at = ? WHERE id = ?", (now, job_id))
            self._event(db, job_id, now, job.state, job.state, note)
            return self._load(db, job_id)

    def forget_jobs(self, ended_before: float, limit: int = 500) -> list[int]:
        finals = [s.value for s in FINAL_STATES]
        with self._transaction() as db:
            # SKIP LOCKED (PostgreSQL): a job a person is retrying right now is left for the next round.
            ids = [row[0] for row in self._run(
                db, f"SELECT id FROM jobs WHERE state IN ({marks(finals)}) AND files_purged_at IS NOT NULL "
                    f"AND updated_at <= ? ORDER BY updated_at, id LIMIT ?{self._SKIP_LOCKED}",
                (*finals, ended_before, limit)).fetchall()]
            for start in range(0, len(ids), _ROWS_PER_QUERY):
                chunk = ids[start:start + _ROWS_PER_QUERY]
                for table, column in (("deliveries", "job_id"), ("job_results", "job_id"), ("job_events", "job_id"),
                                      ("jobs", "id")):
                    self._run(db, f"DELETE FROM {table} WHERE {column} IN ({marks(chunk)})", chunk)
        return ids

