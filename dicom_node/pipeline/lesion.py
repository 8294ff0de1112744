"""Lesion jobs (issue 15): a received lesion SEG joined with its photo's parsing into one SR.

Whichever arrives first:

* the photo's worker writes the parsing it made (label map, person masks, model identity) as
  ``parsing.npz`` beside the photo's results (:func:`save_parsing`; lossless, compressed; deleted by
  retention with the rest of the photo's files). No second network run is ever needed;
* a lesion job is claimed only once that parsing exists (the job store's claim looks at the photo's
  job, see ``RUNNABLE`` in :mod:`dicom_node.queue.sql_store`): a SEG sent after its photo is
  processed at once, one sent before waits in RECEIVED, and the worker that finishes the photo
  claims again right after, which finds it;
* a lesion job still waiting after ``lesion.wait_for_photo_h`` is failed with the reason by the
  worker pool's sweep (:func:`expire_waiting`).

The lesion SR is the photo's TID 1500 report (PS3.16 A.35.1) rebuilt from the same parsing, with
the lesion area and its share of each body region (``lesion_statistics``), sent to the photo's
destinations, and the %TBSA estimate (``parse.tbsa.estimate_tbsa``) of the photo's STUDY: this
photo's lesion combined with the latest lesion of every other photo of the same study that was
joined before (front and back photos give one estimate, each view its side of the chart). So the
lesion SR of a study's last joined photo carries the estimate of the whole study; earlier SRs carry
the estimate of what had arrived then (each says which photos it combines, as the source images of
its %TBSA groups). It references the photo and our body-part SEG (Referenced Segments, TID 1411),
and the lesion SEGs and other photos it used in its evidence (PS3.3 C.17.2.3).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.config import LesionSettings
from dicom_node.decode.lesion_seg import LesionSegError, lesion_mask
from dicom_node.encode.options import EncodeOptions
from dicom_node.logs import fields
from dicom_node.parse.result import ParsingResult, result_from_label_map
from dicom_node.queue.job import Job, JobKind, ResultKind, ResultObject
from dicom_node.queue.store import JobStore
from dicom_node.spool.atomic import atomic_write
from dicom_node.spool.base import Spool

if TYPE_CHECKING:  # parse.tbsa pulls in OpenCV, which the supervisor's process does not need
    from dicom_node.parse.tbsa import PhotoLesion

log = logging.getLogger(__name__)

PARSING_FILE = "parsing.npz"


class LesionJoinError(Exception):
    """The lesion job cannot be joined (its SEG or its photo's results); ``reason`` is for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parsing_path(photo_job: Job | None, results: list[ResultObject] | tuple[ResultObject, ...]) -> str | None:
    """Where a photo job's parsing lies: beside its SR (the one result every parsed photo has)."""
    for result in results:
        if result.kind == ResultKind.SR:
            return str(PurePosixPath(result.path).parent / PARSING_FILE)
    return None


def save_parsing(spool: Spool, results: list[ResultObject], result: ParsingResult) -> None:
    """Keep the parsing a lesion SEG may later be joined with (atomic, like every spool write)."""
    relative = parsing_path(None, results)
    if relative is None:
        return
    persons = (np.stack([np.asarray(p.mask, dtype=bool) for p in result.persons])
               if result.persons else np.zeros((0, *result.label_map.shape), dtype=bool))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, label_map=np.asarray(result.label_map, dtype=np.uint8),
                        persons=np.packbits(persons, axis=-1), columns=np.int64(result.label_map.shape[1]),
                        model_digest=np.str_(result.model_digest), untrained=np.bool_(result.model_untrained))
    atomic_write(spool.path(relative), buffer.getbuffer())


def load_parsing(spool: Spool, relative: str) -> ParsingResult:
    """The parsing :func:`save_parsing` kept; the same label map and persons, so the same SEG plan."""
    with np.load(spool.path(relative), allow_pickle=False) as data:
        columns = int(data["columns"])
        persons = np.unpackbits(data["persons"], axis=-1, count=columns).astype(bool)
        return result_from_label_map(data["label_map"], list(persons), str(data["model_digest"]),
                                     bool(data["untrained"]))


@dataclass(frozen=True, eq=False)
class _StudyPhoto:
    """One photo of a study in its %TBSA estimate: the photo, its lesion SEG, its parsing and mask."""

    photo: Dataset
    seg: Dataset
    lesion: PhotoLesion


@dataclass(eq=False)
class LesionJoin:
    """Builds the lesion SR of one claimed lesion job (in a worker, which owns the job)."""

    store: JobStore
    spool: Spool
    settings: LesionSettings
    labels: EncodeOptions

    def build(self, job: Job) -> tuple[Job, Dataset]:
        """The photo's job and the lesion SR. Raises :class:`LesionJoinError` for what the SEG or the
        photo's kept results make impossible (the job fails with that reason)."""
        from dicom_node.encode.sr import build_measurement_report
        from dicom_node.parse.statistics import lesion_statistics, region_statistics
        from dicom_node.parse.tbsa import PhotoLesion, View, estimate_tbsa, patient_age_years, view_of

        if job.kind != JobKind.LESION or not job.source_uid:
            raise LesionJoinError("not a lesion job")
        photo_job = self.store.find(job.source_uid)
        if photo_job is None or photo_job.parse_s is None or photo_job.files_purged_at is not None:
            raise LesionJoinError(f"the parsing of photo {job.source_uid} is not available")
        seg_ds = self._read(job.photo_path, "lesion SEG")
        photo_ds = self._read(photo_job.photo_path, f"photo of job {photo_job.id}")
        body_seg_path = next((r.path for r in photo_job.results if r.kind == ResultKind.SEG), None)
        body_seg = self._read(body_seg_path, "body-part SEG") if body_seg_path is not None else None
        kept = parsing_path(photo_job, photo_job.results)
        if kept is None or not self.spool.path(kept).is_file():
            raise LesionJoinError(f"photo job {photo_job.id} kept no parsing to join with (parsed before issue 15?)")
        result = load_parsing(self.spool, kept)
        rows, columns = result.size_hw
        try:
            mask = lesion_mask(seg_ds, job.source_uid, rows, columns, self.settings)
        except LesionSegError as exc:
            raise LesionJoinError(str(exc)) from exc

        statistics = region_statistics(result)
        view = view_of(photo_ds)
        # A photo without a View Code Sequence is taken as anterior (a warning in the log).
        this = _StudyPhoto(photo_ds, seg_ds, PhotoLesion(result.label_map, mask, view or View.ANTERIOR))
        others, skipped = self._study_photos(job, photo_job, photo_ds)
        used = [this, *others]
        tbsa = estimate_tbsa([p.lesion for p in used], patient_age_years(photo_ds))
        if skipped:
            tbsa = dataclasses.replace(tbsa, warnings=(*tbsa.warnings, *skipped))
        sr = build_measurement_report(
            photo_ds, body_seg, result, statistics, self.labels, lesion=lesion_statistics(result, mask), tbsa=tbsa,
            lesion_seg=seg_ds, tbsa_photos=[(p.photo, p.lesion.view) for p in used],
            other_evidence=[d for p in others for d in (p.photo, p.seg)])
        unknown = sum(view_of(p.photo) is None for p in used)
        if unknown or tbsa.warnings:
            log.info(fields(event="lesion.tbsa_warnings", job=job.id,
                            view=f"{unknown} photo(s) without a view, taken as anterior" if unknown else None,
                            warnings=" | ".join(tbsa.warnings) or None))
        log.info(fields(event="lesion.joined", job=job.id, photo_job=photo_job.id, sop=job.sop_instance_uid,
                        photo=job.source_uid, lesion_px=int(np.count_nonzero(mask)), study_photos=len(used),
                        tbsa_view=tbsa.view, tbsa_percent=f"{tbsa.percent:.2f}"))
        return photo_job, sr

    def _study_photos(self, job: Job, photo_job: Job, photo_ds: Dataset) -> tuple[list[_StudyPhoto], list[str]]:
        """The other photos of this photo's study whose lesion was joined before, each with its
        latest lesion SEG (a later SEG of a photo replaces an earlier one; this job's replaces any
        of its own photo), and a warning for each that could not be used."""
        from dicom_node.parse.tbsa import PhotoLesion, View, view_of

        study = photo_job.study_uid or str(photo_ds.get("StudyInstanceUID", "") or "")
        if not study:
            return [], []
        latest: dict[str, Job] = {}
        for other in self.store.study_lesion_jobs(study):
            if other.id != job.id and other.source_uid and other.source_uid != job.source_uid:
                latest[other.source_uid] = other  # oldest first: the last one wins
        patient = str(photo_ds.get("PatientID", "") or "")
        photos: list[_StudyPhoto] = []
        skipped: list[str] = []
        for photo_uid, other in latest.items():
            try:
                other_photo_job = self.store.find(photo_uid)
                if other_photo_job is None or other_photo_job.files_purged_at is not None:
                    raise LesionJoinError("its photo's files are gone")
                kept = parsing_path(other_photo_job, other_photo_job.results)
                if kept is None or not self.spool.path(kept).is_file():
                    raise LesionJoinError("its photo kept no parsing")
                other_photo = self._read(other_photo_job.photo_path, f"photo of job {other_photo_job.id}")
                if str(other_photo.get("PatientID", "") or "") != patient:
                    raise LesionJoinError("its photo has another Patient ID")
                other_seg = self._read(other.photo_path, f"lesion SEG of job {other.id}")
                parsing = load_parsing(self.spool, kept)
                rows, columns = parsing.size_hw
                other_mask = lesion_mask(other_seg, photo_uid, rows, columns, self.settings)
            except (LesionJoinError, LesionSegError) as exc:
                why = exc.reason if isinstance(exc, LesionJoinError) else str(exc)
                skipped.append(f"photo {photo_uid} of this study (lesion job {other.id}) is not in the estimate: {why}")
                continue
            view = view_of(other_photo)
            photos.append(_StudyPhoto(other_photo, other_seg,
                                      PhotoLesion(parsing.label_map, other_mask, view or View.ANTERIOR)))
        return photos, skipped

    def _read(self, relative: str | None, what: str) -> Dataset:
        if relative is None or not self.spool.path(relative).is_file():
            raise LesionJoinError(f"the spooled {what} is missing")
        try:
            return pydicom.dcmread(self.spool.path(relative))
        except OSError:
            raise
        except Exception as exc:
            raise LesionJoinError(f"cannot read the {what}: {type(exc).__name__}: {exc}") from exc


def waiting_reason(store: JobStore, job: Job, wait_h: float) -> str:
    """Why a lesion job gave up waiting: no photo, or a photo that was not (or is no longer) parsed."""
    photo = store.find(job.source_uid or "")
    if photo is None:
        return f"no photo {job.source_uid} arrived within {wait_h:g} h"
    if photo.files_purged_at is not None:
        return f"photo {job.source_uid} (job {photo.id}) arrived, but retention has deleted its parsing"
    return (f"photo {job.source_uid} (job {photo.id}, {photo.state.value}) was not parsed within {wait_h:g} h"
            + (f": {photo.reason}" if photo.reason else ""))


def expire_waiting(store: JobStore, settings: LesionSettings, now: float | None = None) -> list[Job]:
    """Fail every lesion job that has waited for its photo's parsing longer than
    ``lesion.wait_for_photo_h`` (called by the worker pool's sweep)."""
    now = time.time() if now is None else now
    before = now - settings.wait_for_photo_h * 3600.0
    failed = []
    for job in store.waiting_lesion_jobs(waiting_since_before=before):
        done = store.fail_waiting(job.id, before, waiting_reason(store, job, settings.wait_for_photo_h))
        if done is not None:
            failed.append(done)
    return failed

