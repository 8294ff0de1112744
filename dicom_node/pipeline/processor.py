"""One job through the processing stage: route, decode, parse, encode, spool the results.

Failure policy, so that one photo never stops the others and none is retried forever:

* the photo itself is the problem (cannot be decoded, no routing destination, parsing or encoding
  raises): the job ends FAILED with the reason, at once. Retrying would fail the same way;
* the machine is the problem (disk full or unwritable, out of memory, the job store full or
  locked): the job goes back to RECEIVED with a delay, up to ``worker.max_attempts`` tries, then FAILED;
* the job was taken away meanwhile (:class:`StaleJobError`): drop it quietly, its new owner has it.

A claim is a lease (``worker.lease_s``): while a job is in hand, a thread renews it every quarter
of the lease (:class:`LeaseRenewal`), so a 12 MP photo parsing for seconds, or a hand-back waiting
out a full disk, keeps its job; a node that dies stops renewing, and once its leases run out
another node's worker takes the jobs over. A renewal refused means the job was taken over: this
worker's next write is refused too, and it drops the job.

Handing a job back (to RECEIVED or FAILED) is itself a write to the job store, and the full disk
that broke the job breaks that write too. It is retried, with pauses growing from 0.5 s to 30 s,
until it lands or the worker is told to stop: a worker that gave up (or died) there would leave its
job in PARSING or ENCODING, held by a live node, until the next restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pydicom
from pydicom.dataset import Dataset

from dicom_node.decode.errors import PhotoError
from dicom_node.decode.photo import photo_from_dataset
from dicom_node.decode.supported import DecodeLimits
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import encode_results
from dicom_node.logs import fields
from dicom_node.parse.engine import HumanParser
from dicom_node.pipeline.lesion import LesionJoin, LesionJoinError, save_parsing
from dicom_node.pipeline.routing import Router, RoutingError
from dicom_node.queue.job import Job, JobKind, JobState, ResultKind, ResultObject
from dicom_node.queue.store import JobStore, JobStoreUnavailableError, StaleJobError
from dicom_node.spool.base import Spool

log = logging.getLogger(__name__)

TRANSIENT_RETRY_DELAY_S = 30.0  # a full disk or memory shortage takes a while to go away
HANDBACK_FIRST_PAUSE_S = 0.5  # first wait before writing a hand-back again
HANDBACK_MAX_PAUSE_S = 30.0  # the pauses double up to this
_REASON_MAX = 500  # job reasons stay one readable line
# A renewal refused this soon before the worker's ``with`` block ends met the worker's own hand-back
# (the job went on to DISPATCHING, DONE, ...), not a take-over.
HANDED_ON_WITHIN_S = 1.0

# The machine's problems, not the photo's: a full or failing disk (OSError, ENOSPC among them),
# memory, and a job store that cannot write now (full, locked: JobStoreUnavailableError, whatever
# the engine). A job they interrupt is tried again; a hand-back they break is written again.
MACHINE_ERRORS: tuple[type[BaseException], ...] = (OSError, MemoryError, JobStoreUnavailableError)


class LeaseRenewal:
    """Renews one job's processing lease every ``lease_s / 4`` while the ``with`` block runs.

    A renewal that fails for the machine's sake (the store unreachable) is tried again at the next
    tick: three of them fit in one lease. One refused (:class:`StaleJobError`) ends the renewals:
    the job was taken over, and :attr:`lost` is set (unless the block ends within
    :data:`HANDED_ON_WITHIN_S`: then the worker's own hand-back came first)."""

    def __init__(self, store: JobStore, job_id: int, owner: str, lease_s: float) -> None:
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.interval_s = lease_s / 4
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseRenewal:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        failing = False
        while not self._done.wait(self.interval_s):
            try:
                self.store.renew_lease(self.job_id, self.owner, self.lease_s)
            except StaleJobError as exc:
                if self._done.wait(HANDED_ON_WITHIN_S):
                    return  # the worker itself handed the job on just before this renewal
                self.lost.set()
                log.warning(fields(event="worker.lease_lost", job=self.job_id, reason=str(exc)))
                return
            except Exception as exc:  # the store is unreachable or full: the next tick tries again
                if not failing:
                    failing = True
                    log.warning(fields(event="worker.lease_renewal_failed", job=self.job_id,
                                       reason=f"{type(exc).__name__}: {exc}",
                                       retry=f"every {self.interval_s:g} s; the lease lasts {self.lease_s:g} s"))
                continue
            if failing:
                failing = False
                log.info(fields(event="worker.lease_renewed", job=self.job_id))


class JobFailure(Exception):
    """The photo cannot be processed; ``reason`` is for the PACS administrator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


def pause_never_stopped(pause_s: float) -> bool:
    """The default ``wait_or_stop``: sleep, and never be told to stop (tests, the CLI)."""
    time.sleep(pause_s)
    return False


@dataclass(eq=False)
class PhotoProcessor:
    """Runs jobs claimed by one worker (``owner``) with one loaded parser.

    ``limits``: what a photo may be to be decoded; ``labels``: how the results are labelled;
    ``max_attempts``: tries of a job that fails for the machine's sake (disk, memory);
    ``transient_retry_delay_s``: how long such a job waits before its next try;
    ``wait_or_stop(pause_s)``: waits up to ``pause_s`` between tries of a hand-back and returns True
    when the worker is told to stop (the worker's stop pipe);
    ``lease_s``: the claim's lease, renewed while a job is in hand (None: not renewed; tests that
    drive the processor by hand).
    """

    store: JobStore
    spool: Spool
    parser: HumanParser
    owner: str
    router: Router
    limits: DecodeLimits
    labels: EncodeOptions
    max_attempts: int
    transient_retry_delay_s: float = TRANSIENT_RETRY_DELAY_S
    wait_or_stop: Callable[[float], bool] = pause_never_stopped
    lesion: LesionJoin | None = None  # joins lesion jobs (issue 15); None: a lesion job fails with a reason
    lease_s: float | None = None

    def run(self, job: Job) -> Job | None:
        """Process one claimed job to DISPATCHING, DONE or FAILED (or back to RECEIVED); never raises
        for a problem with this job or with the machine. Returns the job's new record (None when it
        was taken away, or when the worker was told to stop before its hand-back could be written:
        the job then stays held until the node's recovery at its next start, or until its lease
        runs out and another node takes it over)."""
        if self.lease_s is None:
            return self._run_and_hand_back(job)
        with LeaseRenewal(self.store, job.id, self.owner, self.lease_s):
            return self._run_and_hand_back(job)

    def _run_and_hand_back(self, job: Job) -> Job | None:
        hand_back: Callable[[], Job | None]
        try:
            return self._run(job)
        except StaleJobError as exc:
            log.warning(fields(event="worker.stale_job", job=job.id, reason=str(exc)))
            return None
        except JobFailure as exc:
            hand_back = partial(self._fail, job, exc.reason)
        except MACHINE_ERRORS as exc:
            hand_back = partial(self._transient, job, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug or an unforeseen input: this job fails, the worker goes on
            log.exception(fields(event="worker.job_error", job=job.id))
            hand_back = partial(self._fail, job, f"internal error: {type(exc).__name__}: {exc}")
        return self._hand_back(job, hand_back)

    def _hand_back(self, job: Job, write: Callable[[], Job | None]) -> Job | None:
        """Write a job's hand-back until it lands: a machine error here (the disk still full, the
        store locked) is waited out with growing pauses, logged as ERROR once and as INFO when it
        lands. Gives up only when the worker is told to stop (returns None)."""
        pause_s = HANDBACK_FIRST_PAUSE_S
        failures = 0
        started = time.monotonic()
        while True:
            try:
                handed = write()
            except MACHINE_ERRORS as exc:
                failures += 1
                if failures == 1:
                    log.error(fields(event="worker.handback_failed", job=job.id,
                                     reason=f"{type(exc).__name__}: {exc}",
                                     retry="with growing pauses until it is written"))
                if self.wait_or_stop(pause_s):
                    log.warning(fields(event="worker.handback_abandoned", job=job.id, tries=failures,
                                       reason="the worker is stopping; the node releases the job at its next start"))
                    return None
                pause_s = min(HANDBACK_MAX_PAUSE_S, pause_s * 2)
                continue
            if failures:
                log.info(fields(event="worker.handed_back", job=job.id, tries=failures + 1,
                                after_s=f"{time.monotonic() - started:.1f}",
                                state=handed.state.value if handed is not None else None))
            return handed

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
                                      not_before=time.time() + self.transient_retry_delay_s)
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

    def _run_lesion(self, job: Job) -> Job:
        """A lesion job: the photo's kept parsing and the received SEG make the lesion SR, which goes
        where the photo's results went (see :mod:`dicom_node.pipeline.lesion`)."""
        if self.lesion is None:
            raise JobFailure("lesion input is disabled ([lesion] enabled = false)")
        try:
            photo_job, sr = self.lesion.build(job)
        except LesionJoinError as exc:
            raise JobFailure(exc.reason) from exc
        except MemoryError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise JobFailure(f"building the lesion SR failed: {type(exc).__name__}: {exc}") from exc
        self.store.set_route(job.id, self.owner, photo_job.rule, photo_job.destinations, study_uid=photo_job.study_uid)
        self.store.advance(job.id, self.owner, JobState.ENCODING)
        relative = self.spool.write_result(job.id, ResultKind.SR, sr, attempt=job.attempts)
        result = ResultObject(kind=ResultKind.SR, sop_class_uid=str(sr.SOPClassUID),
                              sop_instance_uid=str(sr.SOPInstanceUID),
                              transfer_syntax_uid=str(sr.file_meta.TransferSyntaxUID), path=relative)
        return self.store.finish_encoding(job.id, self.owner, [result], None)

    def _run(self, job: Job) -> Job:
        if job.kind == JobKind.LESION:
            return self._run_lesion(job)
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
        self.store.set_route(job.id, self.owner, route.rule, route.destinations,
                             study_uid=str(ds.get("StudyInstanceUID", "") or "").strip() or None)

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
            relative = self.spool.write_result(job.id, kind, dataset, attempt=job.attempts)
            results.append(ResultObject(
                kind=kind,
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
                path=relative,
            ))
        save_parsing(self.spool, results, result)  # what a lesion SEG of this photo is joined with
        t4 = time.perf_counter()
        parse_s = float(result.timings_s.get("total", t2 - t1))
        done = self.store.finish_encoding(job.id, self.owner, results, parse_s)
        log.info(fields(event="worker.timings", job=job.id, decode_s=f"{t1 - t0:.3f}", parse_s=f"{t2 - t1:.3f}",
                        encode_s=f"{t3 - t2:.3f}", write_s=f"{t4 - t3:.3f}", objects=len(results),
                        untrained=result.model_untrained or None))
        return done
