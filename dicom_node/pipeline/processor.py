"""One job through the processing stage: route, decode, parse, encode, spool the results.

Failure policy, so that one photo never stops the others and none is retried forever:

* the photo itself is the problem (cannot be decoded, no routing destination, parsing or encoding
  raises): the job ends FAILED with the reason, at once. Retrying would fail the same way;
* the machine is the problem (disk full or unwritable, out of memory): the job goes back to
  RECEIVED with a delay, up to ``worker.max_attempts`` tries, then FAILED;
* the job was taken away meanwhile (:class:`StaleJobError`): drop it quietly, its new owner has it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset

from dicom_node.decode.errors import PhotoError
from dicom_node.decode.photo import photo_from_dataset
from dicom_node.decode.supported import DecodeLimits
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import encode_results
from dicom_node.logs import fields
from dicom_node.parse.engine import HumanParser
from dicom_node.pipeline.routing import Router, RoutingError
from dicom_node.queue.job import Job, JobState, ResultKind, ResultObject
from dicom_node.queue.store import JobStore, StaleJobError
from dicom_node.spool.base import Spool

log = logging.getLogger(__name__)

TRANSIENT_RETRY_DELAY_S = 30.0  # a full disk or memory shortage takes a while to go away
_REASON_MAX = 500  # job reasons stay one readable line


class JobFailure(Exception):
    """The photo cannot be processed; ``reason`` is for the PACS administrator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


@dataclass(eq=False)
class PhotoProcessor:
    """Runs jobs claimed by one worker (``owner``) with one loaded parser.

    ``limits``: what a photo may be to be decoded; ``labels``: how the results are labelled;
    ``max_attempts``: tries of a job that fails for the machine's sake (disk, memory).
    """

    store: JobStore
    spool: Spool
    parser: HumanParser
    owner: str
    router: Router
    limits: DecodeLimits
    labels: EncodeOptions
    max_attempts: int

    def run(self, job: Job) -> Job | None:
        """Process one claimed job to DISPATCHING, DONE or FAILED (or back to RECEIVED); never raises
        for a problem with this job. Returns the job's new record (None when it was taken away)."""
        try:
            return self._run(job)
        except StaleJobError as exc:
            log.warning(fields(event="worker.stale_job", job=job.id, reason=str(exc)))
            return None
        except JobFailure as exc:
            return self._fail(job, exc.reason)
        except (OSError, MemoryError) as exc:
            return self._transient(job, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug or an unforeseen input: this job fails, the worker goes on
            log.exception(fields(event="worker.job_error", job=job.id))
            return self._fail(job, f"internal error: {type(exc).__name__}: {exc}")

    def _fail(self, job: Job, reason: str) -> Job | None:
        try:
            return self.store.fail(job.id, _short(reason), owner=self.owner)
        except StaleJobError:
            return None

    def _transient(self, job: Job, reason: str) -> Job | None:
        try:
            current = self.store.get(job.id)
            if current.attempts >= self.max_attempts:
                return self.store.fail(job.id, _short(f"{reason}; gave up after {current.attempts} attempts"),
                                       owner=self.owner)
            return self.store.requeue(job.id, self.owner, _short(f"{reason}; will try again"),
                                      not_before=time.time() + TRANSIENT_RETRY_DELAY_S)
        except StaleJobError:
            return None

    def _read(self, job: Job) -> Dataset:
        path = self.spool.path(job.photo_path)
        if not path.is_file():
            raise JobFailure(f"the spooled photo {job.photo_path} is missing")
        try:
            return pydicom.dcmread(path)
        except OSError:
            raise
        except Exception as exc:
            raise JobFailure(f"cannot read the received object: {type(exc).__name__}: {exc}") from exc

    def _run(self, job: Job) -> Job:
        t0 = time.perf_counter()
        ds = self._read(job)
        try:
            route = self.router.route(ds, job.calling_ae, job.calling_host)
        except RoutingError as exc:
            raise JobFailure(str(exc)) from exc
        if route is None:
            return self.store.advance(job.id, self.owner, JobState.DONE,
                                      "not processed: no routing rule matches this photo")
        if not route.process:
            return self.store.advance(job.id, self.owner, JobState.DONE,
                                      f"not processed: routing rule {route.rule!r} keeps such photos unparsed")
        self.store.set_route(job.id, self.owner, route.rule, route.destinations)

        try:
            photo = photo_from_dataset(ds, self.limits.max_pixels, self.limits.sop_classes, source=f"job {job.id}")
        except PhotoError as exc:
            raise JobFailure(f"cannot decode the photo: {exc.reason}") from exc
        t1 = time.perf_counter()
        try:
            result = self.parser.parse(photo.rgb)
        except MemoryError:
            raise
        except Exception as exc:
            raise JobFailure(f"parsing failed: {type(exc).__name__}: {exc}") from exc
        t2 = time.perf_counter()

        self.store.advance(job.id, self.owner, JobState.ENCODING)
        try:
            encoded = encode_results(ds, photo.rgb, result, None, self.labels)  # renders the overlay too
        except MemoryError:
            raise
        except Exception as exc:
            raise JobFailure(f"building SEG/SC/SR failed: {type(exc).__name__}: {exc}") from exc
        t3 = time.perf_counter()

        results = []
        for kind, dataset in ((ResultKind.SEG, encoded.seg), (ResultKind.SC, encoded.sc), (ResultKind.SR, encoded.sr)):
            if dataset is None:
                continue
            relative = self.spool.write_result(job.id, kind, dataset)
            results.append(ResultObject(
                kind=kind,
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
                path=relative,
            ))
        t4 = time.perf_counter()
        parse_s = float(result.timings_s.get("total", t2 - t1))
        done = self.store.finish_encoding(job.id, self.owner, results, parse_s)
        log.info(fields(event="worker.timings", job=job.id, decode_s=f"{t1 - t0:.3f}", parse_s=f"{t2 - t1:.3f}",
                        encode_s=f"{t3 - t2:.3f}", write_s=f"{t4 - t3:.3f}", objects=len(results),
                        untrained=result.model_untrained or None))
        return done
