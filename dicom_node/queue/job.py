"""Job states and records: what the node knows about one received photo.

A job is created when a photo is acknowledged. Its record is how a PACS administrator learns what
arrived, what was done and, when something failed, why; the retention stage deletes its files
(``files_purged_at``) and, later, the record itself (``retention.job_history_days``).

State flow (PS: one photo in, three result objects out)::

    received -> parsing -> encoding -> dispatching -> done
         \\________\\__________\\____________\\-------> failed   (reason set; `jobs retry` re-opens)

A *lesion* job (``kind = lesion``, issue 15) is a received lesion Segmentation of a photo
(``source_uid``). It takes the same states; it stays ``received`` until its photo's parsing is
there (the photo's job has reached dispatching or done with a parse), is then claimed like any job,
and ends with one result: the lesion SR. ``received`` longer than ``lesion.wait_for_photo_h``:
``failed``, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class JobState(StrEnum):
    RECEIVED = "received"  # spooled and committed; waiting for a worker
    PARSING = "parsing"  # a worker decodes and parses the photo
    ENCODING = "encoding"  # a worker builds SEG, SC and SR and spools them
    DISPATCHING = "dispatching"  # results spooled; being sent, or waiting for the next attempt
    DONE = "done"  # every result delivered (or nothing to do: see reason)
    FAILED = "failed"  # stopped with a reason; waits for a person (`dicom-node jobs retry`)


# States in which a worker owns the job (released to RECEIVED when the worker is gone).
PROCESSING_STATES: frozenset[JobState] = frozenset({JobState.PARSING, JobState.ENCODING})
FINAL_STATES: frozenset[JobState] = frozenset({JobState.DONE, JobState.FAILED})


class JobKind(StrEnum):
    """What a job was made from."""

    PHOTO = "photo"  # a received photo: parse, then SEG, SC and SR
    LESION = "lesion"  # a received lesion SEG of a photo: joined with the photo's parsing, then an SR


@dataclass(frozen=True)
class NewJob:
    """What intake knows when it commits a received photo."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    calling_host: str
    photo_path: str  # relative to the data directory (for a lesion job: the received SEG)
    kind: JobKind = JobKind.PHOTO
    source_uid: str | None = None  # a lesion job's photo (SOP Instance UID)


class ResultKind(StrEnum):
    """The result objects one parsed photo gives, in sending order (the SR references the other two)."""

    SEG = "seg"  # Segmentation: one segment per body part / garment and per person
    SC = "sc"  # colour Secondary Capture: the overlay every viewer shows
    SR = "sr"  # TID 1500 measurement report


@dataclass(frozen=True)
class ResultObject:
    """One spooled result object waiting to be, or already, delivered."""

    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the data directory


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    calling_host: str
    photo_path: str
    state: JobState
    attempts: int  # processing attempts started (claims by a worker)
    dispatch_attempts: int  # dispatch attempts that failed since the results were made
    not_before: float | None  # epoch seconds: no attempt before this time (backoff)
    owner: str | None  # the worker or dispatcher holding the job
    reason: str | None  # why it failed, or a note on how it ended or why it waits
    destinations: tuple[str, ...]  # where the routing sends the results
    rule: str | None  # the routing rule that took the photo
    parse_s: float | None  # parsing time of the last successful parse
    received_at: float
    updated_at: float
    dispatching_since: float | None = None  # when its results were first ready to send (the retry horizon)
    files_purged_at: float | None = None  # when retention deleted its photo and results
    results: tuple[ResultObject, ...] = ()
    deliveries: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # (destination, SOP Instance UID)
    kind: JobKind = JobKind.PHOTO
    source_uid: str | None = None  # a lesion job's photo (SOP Instance UID)
    study_uid: str | None = None  # a photo's Study Instance UID, recorded when a worker routes it

    def pending(self, destination: str) -> list[ResultObject]:
        """Result objects not yet delivered to ``destination``, in sending order."""
        return [r for r in self.results if (destination, r.sop_instance_uid) not in self.deliveries]


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's history: a state transition, or a note within a state (retry scheduled)."""

    job_id: int
    at: float
    from_state: JobState | None
    to_state: JobState
    reason: str | None
