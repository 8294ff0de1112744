"""The job store interface: every state change of a job goes through one of these methods.

Why an interface: the embedded default (SQLite in the data directory) serves one machine; a later
engine (PostgreSQL, say) lets several worker machines share one queue. Both keep the same
guarantees, which the stages rely on:

* ``add_received`` is durable when it returns (intake acknowledges only then) and idempotent on the
  SOP Instance UID (a photo received twice is one job).
* Claims are atomic: two workers never hold the same job. Owners are named by
  :mod:`dicom_node.queue.owners` so that recovery on one machine releases only what it held.
* A processing claim is a lease (``worker.lease_s``) that its worker renews while it parses and
  encodes (:meth:`JobStore.renew_lease`). A lease that runs out means its holder is presumed dead
  (its node died, or lost the job store): the next claim on any node takes the job over. This is
  how the nodes of a group sharing one store pick up a dead node's work without waiting for it.
* Every method that acts for an owner raises :class:`StaleJobError` when the job is no longer
  theirs (it was released after the worker was presumed dead), so a late worker cannot overwrite.
* Each transition is written to the job's history and logged as one structured line.
"""

from __future__ import annotations

import datetime
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from dicom_node.logs import fields
from dicom_node.queue.job import Job, JobEvent, JobState, NewJob, ResultObject

log = logging.getLogger("dicom_node.jobs")

PROCESSING_LEASE_S = 120.0  # worker.lease_s's default: how long a processing claim lasts unrenewed
MAX_ATTEMPTS = 3  # worker.max_attempts's default


def lease_expired(previous_owner: str | None) -> str:
    """Why a job whose processing lease ran out was taken from its holder."""
    return f"lease of {previous_owner or 'nobody'} expired (node presumed dead)"


def takeover_reason(previous_owner: str | None, owner: str) -> str:
    """The history line of a job whose processing lease ran out and that another worker takes."""
    return f"{lease_expired(previous_owner)}; taken over by {owner}"


class StaleJobError(RuntimeError):
    """The job is not (or no longer) in the state and hands the caller expected."""


class JobNotFoundError(KeyError):
    """No job has that id."""


class JobStoreUnavailableError(RuntimeError):
    """A write could not be made now (the disk is full, the database is locked or unreachable).

    The machine's problem, not the job's: every engine raises this one type for it, so that the
    stages wait and write again instead of knowing each engine's own exceptions."""


class JobStore(ABC):
    """Durable job records shared by intake, workers, dispatchers and the CLI."""

    # ------------------------------------------------------------------ intake

    @abstractmethod
    def add_received(self, new: NewJob) -> tuple[Job, bool]:
        """Commit a received photo as a RECEIVED job. Returns ``(job, created)``; ``created`` is
        False when that SOP Instance UID already has a job (which is returned unchanged)."""

    # ------------------------------------------------------------------ reading

    @abstractmethod
    def get(self, job_id: int) -> Job:
        """The job with that id; raises :class:`JobNotFoundError`."""

    @abstractmethod
    def find(self, sop_instance_uid: str) -> Job | None:
        """The job of a received SOP Instance UID, if any."""

    @abstractmethod
    def list_jobs(self, states: Iterable[JobState] | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally only in ``states``."""

    @abstractmethod
    def history(self, job_id: int) -> list[JobEvent]:
        """Every recorded transition of one job, oldest first."""

    @abstractmethod
    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state."""

    # ------------------------------------------------------------------ processing (workers)

    @abstractmethod
    def claim_for_processing(self, owner: str, now: float | None = None, lease_s: float = PROCESSING_LEASE_S,
                             max_attempts: int = MAX_ATTEMPTS) -> Job | None:
        """Take the oldest job that may run now: -> PARSING, attempts + 1, leased to ``owner`` until
        ``now + lease_s`` (the worker keeps it with :meth:`renew_lease`).

        That is a RECEIVED job whose backoff is over, or a PARSING or ENCODING job whose lease ran
        out: its holder is presumed dead (its node was killed, or lost the store). Such a job goes
        back through RECEIVED, with the history line :func:`takeover_reason`, and is claimed again,
        counted as an attempt: what its dead holder encoded but did not record is made again (it was
        never sent; recorded results are DISPATCHING and never taken over here). A job taken over
        after ``max_attempts`` attempts ends FAILED instead (and the next one is looked for): a
        photo that kills every node that parses it must not kill nodes forever.

        The dead holder's late writes, a lease renewal among them, are refused
        (:class:`StaleJobError`) from the moment the job is taken over."""

    @abstractmethod
    def renew_lease(self, job_id: int, owner: str, lease_s: float, now: float | None = None) -> float:
        """Extend ``owner``'s processing lease on a PARSING or ENCODING job to ``now + lease_s`` and
        return that time. :class:`StaleJobError` when the job is no longer theirs (it was taken over
        or released): the holder must not write it again."""

    @abstractmethod
    def set_route(self, job_id: int, owner: str, rule: str | None, destinations: Sequence[str],
                  study_uid: str | None = None) -> Job:
        """Record which routing rule took the photo and where its results go, and the photo's
        Study Instance UID (read from its header by the worker; None keeps what is recorded)."""

    @abstractmethod
    def advance(self, job_id: int, owner: str, to_state: JobState, reason: str | None = None) -> Job:
        """Move an owned job forward (PARSING -> ENCODING, or -> DONE when there is nothing to do).
        Moving to DONE releases it."""

    @abstractmethod
    def finish_encoding(
        self, job_id: int, owner: str, results: Sequence[ResultObject], parse_s: float | None
    ) -> Job:
        """ENCODING -> DISPATCHING with the spooled results, released, dispatchable at once."""

    @abstractmethod
    def requeue(self, job_id: int, owner: str, reason: str, not_before: float | None = None) -> Job:
        """Back to RECEIVED (a transient failure): another attempt after ``not_before``."""

    @abstractmethod
    def fail(self, job_id: int, reason: str, owner: str | None = None) -> Job:
        """-> FAILED with ``reason``; ``owner`` None for a person or recovery acting on any job."""

    # ------------------------------------------------------------------ dispatch

    @abstractmethod
    def claim_for_dispatch(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        """Lease the oldest DISPATCHING job whose next attempt is due."""

    @abstractmethod
    def record_delivery(self, job_id: int, owner: str, destination: str, sop_instance_uid: str) -> None:
        """One result object reached one destination (so a later attempt does not send it again)."""

    @abstractmethod
    def dispatch_succeeded(self, job_id: int, owner: str) -> Job:
        """Everything delivered: DISPATCHING -> DONE."""

    @abstractmethod
    def dispatch_failed(self, job_id: int, owner: str, reason: str, retry_at: float | None) -> Job:
        """An attempt failed: dispatch_attempts + 1, then wait until ``retry_at`` or, when None,
        -> FAILED (past the retry limit: a person retries)."""

    # ------------------------------------------------------------------ recovery and people

    @abstractmethod
    def release_owner(self, owner_prefix: str, reason: str, max_attempts: int, charge: bool = True) -> list[Job]:
        """Release every job held by owners starting with ``owner_prefix`` (they are gone).

        ``charge`` True (a worker died while the node lived): processing jobs go back to RECEIVED,
        or to FAILED once they have used ``max_attempts`` (a photo that kills its worker every time
        must not kill workers forever). ``charge`` False (the whole node stopped: not the photo's
        doing): they go back to RECEIVED and the interrupted attempt is not counted. Dispatch leases
        are dropped either way, so the next attempt happens when it was due."""

    @abstractmethod
    def held_jobs(self, owner_prefix: str, states: Iterable[JobState] | None = None) -> list[Job]:
        """Jobs held by owners starting with ``owner_prefix`` (optionally only in ``states``), oldest
        first. A read only: the worker pool's sweep compares the holders with its live workers and
        releases only what a gone one still holds."""

    @abstractmethod
    def retry(self, job_id: int, reason: str = "retried by hand") -> Job:
        """A person re-opens a FAILED job: to DISPATCHING when its results exist, else RECEIVED."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (call once the stages using this store have stopped)."""

    # ------------------------------------------------------------------ shared helpers

    @staticmethod
    def log_transition(job: Job, from_state: JobState | None, reason: str | None) -> None:
        """The one structured log line per job transition (ids and UIDs only, never patient data)."""
        level = logging.WARNING if job.state == JobState.FAILED else logging.INFO
        log.log(
            level,
            fields(
                event="job",
                job=job.id,
                sop=job.sop_instance_uid,
                from_state=from_state.value if from_state else "-",
                to_state=job.state.value,
                attempts=job.attempts,
                dispatch_attempts=job.dispatch_attempts or None,
                calling_ae=job.calling_ae,
                reason=reason,
            ),
        )

    # ------------------------------------------------------------------ lesion jobs (issue 15)

    @abstractmethod
    def waiting_lesion_jobs(self, waiting_since_before: float | None = None) -> list[Job]:
        """RECEIVED lesion jobs whose photo's parsing is not (or no longer) there, optionally only
        those waiting (unchanged) since ``waiting_since_before`` or longer; oldest first."""

    @abstractmethod
    def study_lesion_jobs(self, study_uid: str) -> list[Job]:
        """Lesion jobs that made their SR (DISPATCHING or DONE) for a photo of study ``study_uid``,
        while both still have their files; oldest first. The %TBSA of a study combines them."""

    @abstractmethod
    def fail_waiting(self, job_id: int, waiting_since_before: float, reason: str) -> Job | None:
        """-> FAILED with ``reason``, in one step, only while the lesion job still waits for its
        photo since ``waiting_since_before`` (a photo parsed meanwhile makes it runnable instead).
        Returns the failed job, or None when it no longer qualifies."""

    # ------------------------------------------------------------------ retention

    @abstractmethod
    def jobs_with_files(self, states: Iterable[JobState] | None = None, ended_before: float | None = None,
                        limit: int | None = None) -> list[Job]:
        """Jobs whose photo and results have not been deleted (``files_purged_at`` unset), optionally
        only in ``states`` and last changed at or before ``ended_before``; the longest unchanged first.

        For a DONE or FAILED job the last change is when it ended; what the cleaner deletes, and
        in which order, follows from that."""

    @abstractmethod
    def mark_files_purged(self, job_id: int, ended_before: float, note: str) -> Job | None:
        """Claim a DONE or FAILED job's files for deletion: set ``files_purged_at`` and write ``note``
        to its history, in one step, but only while it is still DONE or FAILED, unchanged since
        ``ended_before`` and not yet purged. Returns the job, or None when it no longer qualifies
        (a person retried it meanwhile). Marked first, deleted after: a job whose files may be
        gone can never be retried, and files a crash left behind are unreferenced (orphans)."""

    @abstractmethod
    def forget_jobs(self, ended_before: float, limit: int = 500) -> list[int]:
        """Delete the records (job, results, deliveries, history) of DONE and FAILED jobs that ended
        at or before ``ended_before`` and whose files are already deleted; at most ``limit`` jobs
        per call. Returns their ids."""

    @staticmethod
    def files_purged_message(job: Job) -> str:
        """Why a job whose files are gone cannot be processed or sent again (``retry``, ``jobs retry``)."""
        when = datetime.datetime.fromtimestamp(job.files_purged_at or 0).isoformat(sep=" ", timespec="seconds")
        return (f"job {job.id}'s photo and results were deleted by retention at {when}; "
                "it cannot be retried: the node no longer holds them")
