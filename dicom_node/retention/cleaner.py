"""The cleaner: deletes what the node no longer needs, so that its disk stays bounded.

The node is a processing step, not an archive: it offers no Storage Commitment (PS3.4 Annex J),
so the PACS that sent a photo keeps the original, and once the results are delivered the node's
copies serve only to answer "what happened to this photo". Each round (``retention.interval_s``,
and once at start) the cleaner

1. deletes the photo and results of DONE jobs ``done_after_h`` after they ended, and of FAILED jobs
   ``failed_after_h`` after they failed (a person may retry until then), marking ``files_purged_at``;
2. deletes files no job refers to, once older than :data:`ORPHAN_GRACE_S` (a photo whose commit
   failed, a temporary file a crash left): a crash cannot leak disk;
3. when the spool is still over ``max_spool_gb``, deletes the oldest DONE jobs' files before their
   time until it is under; never a FAILED job's before ``failed_after_h``. Still over: one WARNING
   per round says what holds the space;
4. deletes the records (job, results, deliveries, history) of jobs that ended ``job_history_days``
   ago and whose files are gone.

What is not yet delivered (received, parsing, encoding, dispatching) is never touched: the job
store hands out only DONE and FAILED jobs for deletion, and marks a job purged in the same step as
it checks that, so a job a person retries at the same moment keeps its files. A job is marked
before its files go, and a purged job is never retried: files a crash leaves behind are orphans.

Errors (a file already gone, a locked or broken job store) are logged and counted; the round goes
on with the next job or step, and the next round tries again. Each transaction is one job (or one
batch of forgotten records), so intake never waits long for the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.config import RetentionSettings
from dicom_node.logs import fields
from dicom_node.monitor.metrics import NullMetrics, StageMetrics
from dicom_node.queue.job import FINAL_STATES, Job, JobState
from dicom_node.queue.store import JobStore
from dicom_node.retention.reasons import DeletionReason
from dicom_node.spool.base import FileTally, Spool

log = logging.getLogger(__name__)

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
GB = 1_000_000_000  # max_spool_gb counts decimal gigabytes, as disks are sold and `df -H` shows
ORPHAN_GRACE_S = HOUR_S  # a file no job names is kept this long: it may be a write about to be committed
BATCH = 200  # jobs read (or records forgotten) per store call: short transactions, bounded memory


@dataclass
class Tally:
    """What one round (or one ``jobs purge``) deleted."""

    jobs: int = 0  # jobs whose files were deleted
    files: int = 0
    bytes: int = 0
    forgotten: int = 0  # job records deleted
    by_reason: dict[str, FileTally] = field(default_factory=dict)

    def add(self, why: DeletionReason, freed: FileTally, job: bool = True) -> None:
        self.jobs += int(job)
        self.files += freed.files
        self.bytes += freed.bytes
        before = self.by_reason.get(why.value, FileTally())
        self.by_reason[why.value] = FileTally(before.files + freed.files, before.bytes + freed.bytes)


@dataclass(frozen=True)
class PlannedPurge:
    """A job whose files ``jobs purge --dry-run`` would delete."""

    job: Job
    files: FileTally


class Cleaner:
    """The retention stage: a thread that runs :meth:`run_once` every ``settings.interval_s``."""

    def __init__(self, settings: RetentionSettings, store: JobStore, spool: Spool,
                 metrics: StageMetrics | None = None, clock: Callable[[], float] = time.time,
                 orphan_grace_s: float = ORPHAN_GRACE_S) -> None:
        """``clock`` gives epoch seconds (injectable: a test lets a week pass in seconds); it must
        be the clock the job store stamps its records with."""
        self.settings = settings
        self.store = store
        self.spool = spool
        self.metrics: StageMetrics = metrics if metrics is not None else NullMetrics()
        self.clock = clock
        self.orphan_grace_s = orphan_grace_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the stage

    def start(self) -> None:
        """Run a round now (in the cleaner's thread: start-up does not wait for it), then every interval."""
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the file being deleted; a round cut short resumes at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.settings.interval_s)

    def run_once(self) -> Tally:
        """One round of the four steps; a step that fails is logged and the next one runs."""
        tally = Tally()
        now = self.clock()
        settings = self.settings
        steps: list[tuple[str, Callable[[], None]]] = [
            (DeletionReason.DONE_AFTER_H.value, lambda: self._purge(
                [JobState.DONE], now - settings.done_after_h * HOUR_S, DeletionReason.DONE_AFTER_H, tally)),
            (DeletionReason.FAILED_AFTER_H.value, lambda: self._purge(
                [JobState.FAILED], now - settings.failed_after_h * HOUR_S, DeletionReason.FAILED_AFTER_H, tally)),
            (DeletionReason.ORPHAN.value, lambda: self._sweep_orphans(now, tally)),
            (DeletionReason.MAX_SPOOL_GB.value, lambda: self._bound_spool(now, tally)),
            ("job_history_days", lambda: self._forget(now - settings.job_history_days * DAY_S, tally)),
        ]
        for step, run in steps:
            if self._stop.is_set():
                break
            try:
                run()
            except Exception as exc:  # a locked or broken store, a file system error: next round
                self.metrics.retention_error()
                log.error(fields(event="retention.error", step=step, reason=f"{type(exc).__name__}: {exc}"))
        if tally.files or tally.forgotten:
            log.info(fields(event="retention.round", jobs=tally.jobs, files=tally.files, bytes=tally.bytes,
                            forgotten=tally.forgotten))
        return tally

    # ------------------------------------------------------------------ steps

    def _purge(self, states: list[JobState], ended_before: float, why: DeletionReason, tally: Tally,
               enough: Callable[[], bool] = lambda: False) -> None:
        """Delete the files of jobs in ``states`` that ended by ``ended_before``, oldest first,
        until ``enough()`` says so."""
        skipped: set[int] = set()  # jobs that failed to delete this round: not asked for again
        while not self._stop.is_set() and not enough():
            jobs = [j for j in self.store.jobs_with_files(states, ended_before, limit=BATCH + len(skipped))
                    if j.id not in skipped]
            if not jobs:
                return
            for job in jobs:
                if self._stop.is_set() or enough():
                    return
                if not self.purge_job(job, ended_before, why, tally):
                    skipped.add(job.id)

    def purge_job(self, job: Job, ended_before: float, why: DeletionReason, tally: Tally) -> bool:
        """Mark one DONE or FAILED job purged, then delete its files. False when it could not be
        marked (it changed meanwhile) or deleting failed (logged; the orphan sweep finishes it)."""
        try:
            marked = self.store.mark_files_purged(job.id, ended_before, f"photo and results deleted ({why.value})")
        except Exception as exc:
            self.metrics.retention_error()
            log.error(fields(event="retention.error", job=job.id, step="mark",
                             reason=f"{type(exc).__name__}: {exc}"))
            return False
        if marked is None:  # retried, or purged by someone else, since it was listed
            return False
        try:
            freed = self.spool.delete_job_files(marked.id, marked.photo_path, [r.path for r in marked.results])
        except OSError as exc:
            self.metrics.retention_error()
            log.warning(fields(event="retention.delete_failed", job=marked.id, why=why.value,
                               reason=f"{type(exc).__name__}: {exc}", then="the orphan sweep retries after its grace"))
            return False
        tally.add(why, freed)
        self.metrics.retention_deleted(why.value, freed.files, freed.bytes)
        log.info(fields(event="retention.deleted", job=marked.id, bytes=freed.bytes, files=freed.files,
                        why=why.value, state=marked.state.value))
        return True

    def _sweep_orphans(self, now: float, tally: Tally) -> None:
        # What the jobs hold is read before the spool is listed: a file written after this read is
        # younger than the grace, so it is never taken for an orphan.
        holders = self.store.jobs_with_files()
        photos = {j.photo_path for j in holders}
        job_ids = {j.id for j in holders}
        for orphan in self.spool.sweep_orphans(photos, job_ids, now - self.orphan_grace_s):
            tally.add(DeletionReason.ORPHAN, FileTally(1, orphan.bytes), job=False)
            self.metrics.retention_deleted(DeletionReason.ORPHAN.value, 1, orphan.bytes)
            log.info(fields(event="retention.deleted", job=orphan.job_id, path=orphan.path, bytes=orphan.bytes,
                            files=1, why=DeletionReason.ORPHAN.value))

    def _bound_spool(self, now: float, tally: Tally) -> None:
        cap = int(self.settings.max_spool_gb * GB)
        usage = self.spool.usage_bytes()
        if usage > cap:
            measured, freed_before = usage, tally.bytes

            def under_cap() -> bool:
                return measured - (tally.bytes - freed_before) <= cap

            self._purge([JobState.DONE], now, DeletionReason.MAX_SPOOL_GB, tally, enough=under_cap)
            usage = self.spool.usage_bytes()
            log.info(fields(event="retention.cap_applied", freed_bytes=tally.bytes - freed_before,
                            spool_bytes=usage, cap_bytes=cap))
            if usage > cap:
                self._warn_over_cap(usage, cap)
        self.metrics.spool_size(usage)

    def _warn_over_cap(self, usage: int, cap: int) -> None:
        """Say what holds the space the cleaner may not free (once per round)."""
        held: dict[str, list[int]] = {"undelivered": [], "failed": []}  # bytes per job
        for job in self.store.jobs_with_files():
            if job.state == JobState.FAILED or job.state not in FINAL_STATES:
                kind = "failed" if job.state == JobState.FAILED else "undelivered"
                held[kind].append(self.spool.job_files(job.id, job.photo_path).bytes)
        undelivered, failed = held["undelivered"], held["failed"]
        other = max(0, usage - sum(undelivered) - sum(failed))
        log.warning(fields(
            event="retention.spool_over_cap", spool_bytes=usage, cap_bytes=cap,
            undelivered_jobs=len(undelivered), undelivered_bytes=sum(undelivered),
            failed_jobs=len(failed), failed_bytes=sum(failed), other_bytes=other,
            hint="undelivered jobs are never deleted (is a destination down?); failed jobs are kept "
                 f"{self.settings.failed_after_h:g} h for a retry (retry or `dicom-node jobs purge` them); "
                 f"other: files younger than {self.orphan_grace_s:g} s no job refers to yet"))

    def _forget(self, ended_before: float, tally: Tally, why: str = "job_history_days") -> None:
        while not self._stop.is_set():
            ids = self.store.forget_jobs(ended_before, limit=BATCH)
            for job_id in ids:
                log.info(fields(event="retention.forgotten", job=job_id, why=why))
            if ids:
                tally.forgotten += len(ids)
                self.metrics.retention_forgotten(len(ids))
            if len(ids) < BATCH:
                return

    # ------------------------------------------------------------------ by hand (`dicom-node jobs purge`)

    def plan_purge(self, ended_before: float) -> list[PlannedPurge]:
        """The DONE and FAILED jobs that ended by ``ended_before`` and still hold files (a dry run)."""
        return [PlannedPurge(job, self.spool.job_files(job.id, job.photo_path))
                for job in self.store.jobs_with_files(FINAL_STATES, ended_before)]

    def purge_ended_before(self, ended_before: float, forget: bool = False) -> Tally:
        """Delete the files of every DONE and FAILED job that ended by ``ended_before`` (never an
        undelivered one); ``forget``: also delete those jobs' records and history."""
        tally = Tally()
        self._purge(list(FINAL_STATES), ended_before, DeletionReason.BY_HAND, tally)
        if forget:
            self._forget(ended_before, tally, why=DeletionReason.BY_HAND.value)
        return tally

