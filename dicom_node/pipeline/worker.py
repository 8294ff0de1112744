"""The worker process: load the model once, then claim and process jobs until told to stop.

A separate process, not a thread, because what can kill a worker (a decoder crashing on a hostile
file, the kernel killing a process that ran out of memory on a huge photo) must not take intake
down with it. The supervisor releases a dead worker's job and starts a new worker. A job store
or disk that refuses writes does not end a worker: it waits out a failing claim, and the processor
writes a job's hand-back again until it lands (or the worker is told to stop).

Every claim is a lease (``worker.lease_s``) the worker renews while the job is in hand. When a
whole node dies, no supervisor is left to release its workers' jobs: on a job store several nodes
share, their leases run out and the claims of the other nodes' workers take them over.

The worker talks to the node through two one-way pipes and no shared lock: a lock held by a
process that gets killed would hang whoever waits for it next. The *stop* pipe is never written:
the node closes its end to stop the workers, and the kernel closes it when the node dies, so a
SIGKILLed node leaves no orphan holding jobs (PR_SET_PDEATHSIG is a second line of defence).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path

from pydantic import SecretStr

from dicom_node.allocator import resident_mib
from dicom_node.config import LesionSettings, WorkerSettings
from dicom_node.decode.supported import DecodeLimits
from dicom_node.encode.options import EncodeOptions
from dicom_node.lifetime import die_with_parent
from dicom_node.logs import fields
from dicom_node.pipeline.routing import Router
from dicom_node.queue.doorbell import Doorbells, IdleWait

log = logging.getLogger(__name__)

EXIT_STOPPED = 0
EXIT_MODEL_UNAVAILABLE = 3  # the model cannot load: retrying at once would fail the same way
EXIT_RECYCLE = 4  # resident size above worker.recycle_rss_mib after a job: replace me at once, no death


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker process is given, built by the node from its configuration.

    Plain, picklable values: it crosses into a spawned process. The worker opens its own job
    store and spool from these paths (connections do not cross processes).
    """

    settings: WorkerSettings
    model_dir: Path
    job_db_path: Path
    data_dir: Path  # the spool's root's parent: spooled paths are relative to it
    log_level: str
    router: Router
    limits: DecodeLimits
    labels: EncodeOptions
    log_format: str = "text"  # the node's: a shipper reading its JSON lines gets no text line from a worker
    lesion: LesionSettings | None = None  # lesion SEG jobs (issue 15); None or disabled: they fail
    job_store_url: SecretStr | None = None  # [job_store] url: PostgreSQL; None: the SQLite file job_db_path
    spool_dir: Path | None = None  # the spool's root (spool_dir); None: <data_dir>/spool


class MessageKind(StrEnum):
    READY = "ready"  # the model is loaded (detail: its digest)
    MODEL_ERROR = "model_error"  # the model cannot load (detail: why)
    PARSED = "parsed"  # a photo was parsed (detail: the parse's seconds)


@dataclass(frozen=True)
class WorkerMessage:
    """What a worker tells the supervisor (through its own pipe)."""

    kind: MessageKind
    slot: int
    pid: int
    detail: str


def torch_threads(settings: WorkerSettings) -> int:
    """Threads per worker: the configured number, else the CPU cores shared among the workers."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, settings.count))


def _send(messages: Connection, message: WorkerMessage) -> None:
    try:
        messages.send(message)
    except (OSError, ValueError):  # the node is gone; the stop pipe ends us next
        pass


def worker_main(setup: WorkerSetup, slot: int, owner: str, messages: Connection, stop: Connection,
                parent_pid: int, doorbells: Doorbells) -> None:
    """Entry point of a worker process (spawned by :class:`~dicom_node.pipeline.supervisor.WorkerPool`)."""
    die_with_parent()
    # Ctrl-C, and systemd's SIGTERM to the whole process group, reach the node too: it stops us in
    # order (closes the stop pipe; we finish the photo in hand), so a normal stop is no worker death.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from dicom_node.logs import setup_logging

    setup_logging(setup.log_level, setup.log_format)
    if os.getppid() != parent_pid:  # the node died while we were starting
        sys.exit(EXIT_STOPPED)

    from dicom_node.parse.engine import HumanParser
    from dicom_node.pipeline.lesion import LesionJoin
    from dicom_node.pipeline.processor import PhotoProcessor
    from dicom_node.queue.factory import open_job_store
    from dicom_node.queue.job import JobState
    from dicom_node.spool.local import LocalSpool

    parsed_states = (JobState.DISPATCHING, JobState.DONE)  # the photo was parsed (its parse_s is this run's)

    try:
        parser = HumanParser.from_model_dir(setup.model_dir, threads=torch_threads(setup.settings),
                                            postprocess_mode=setup.settings.postprocess,
                                            runtime=setup.settings.runtime,
                                            runtime_max_rss_mib=setup.settings.runtime_max_rss_mib)
    except Exception as exc:  # ModelLoadError, a truncated file, out of memory: all mean "no model"
        _send(messages, WorkerMessage(MessageKind.MODEL_ERROR, slot, os.getpid(), f"{type(exc).__name__}: {exc}"))
        sys.exit(EXIT_MODEL_UNAVAILABLE)
    detail = f"model {parser.model_digest[:16]}{' (UNTRAINED)' if parser.untrained else ''}"
    _send(messages, WorkerMessage(MessageKind.READY, slot, os.getpid(), detail))

    def told_to_stop(pause_s: float) -> bool:
        """Wait up to ``pause_s``; True as soon as the node closed the stop pipe or died."""
        return stop.poll(pause_s) or os.getppid() != parent_pid

    store = open_job_store(setup.job_db_path, setup.job_store_url)
    spool = LocalSpool(setup.data_dir, setup.spool_dir)
    lesion = (LesionJoin(store, spool, setup.lesion, setup.labels)
              if setup.lesion is not None and setup.lesion.enabled else None)
    processor = PhotoProcessor(store, spool, parser, owner, setup.router, setup.limits,
                               setup.labels, setup.settings.max_attempts, wait_or_stop=told_to_stop, lesion=lesion,
                               lease_s=setup.settings.lease_s)
    poll_s = setup.settings.poll_interval_s
    idle = IdleWait(doorbells.photo_received, poll_s)
    claim_failing_since: float | None = None  # an outage of the store is logged once, and its end
    recycle = False
    log.info(fields(event="worker.started", slot=slot, pid=os.getpid(), owner=owner))
    try:
        # The stop pipe is readable only at EOF: the node closed its end, or died.
        while not told_to_stop(0):
            try:
                job = store.claim_for_processing(owner, lease_s=setup.settings.lease_s,
                                                 max_attempts=setup.settings.max_attempts)
            except Exception as exc:  # the store is busy, full or unreachable: wait, do not die
                if claim_failing_since is None:
                    claim_failing_since = time.monotonic()
                    log.error(fields(event="worker.claim_failed", slot=slot, reason=f"{type(exc).__name__}: {exc}",
                                     retry=f"every {max(poll_s, 1.0):g} s"))
                stop.poll(max(poll_s, 1.0))
                continue
            if claim_failing_since is not None:
                log.info(fields(event="worker.claims_resumed", slot=slot,
                                after_s=f"{time.monotonic() - claim_failing_since:.1f}"))
                claim_failing_since = None
            if job is None:
                idle.nothing_to_do()  # the pool rings the bell after closing the stop pipe, too
                continue
            idle.found_work()
            finished = processor.run(job)
            if finished is not None and finished.state == JobState.DISPATCHING:
                doorbells.results_ready.ring()
            if finished is not None and finished.parse_s is not None and finished.state in parsed_states:
                _send(messages, WorkerMessage(MessageKind.PARSED, slot, os.getpid(), repr(finished.parse_s)))
            if _outgrown(setup.settings.recycle_rss_mib, slot):
                recycle = True
                break
    finally:
        store.close()
        log.info(fields(event="worker.stopped", slot=slot, pid=os.getpid()))
    sys.exit(EXIT_RECYCLE if recycle else EXIT_STOPPED)


def _outgrown(limit_mib: float, slot: int) -> bool:
    """Between jobs (never with one in hand): is this worker's resident size above ``limit_mib``?

    A worker keeps the memory it freed for reuse (dicom_node/allocator.py), so its resident size
    is its high-water mark: about 1.1 GiB for the full model at 12 MP (README). Whatever grows it
    beyond that over months (a leak in a library, one huge photo's buffers) is given back by
    exiting; the supervisor starts a fresh worker at once, as Celery's ``max_memory_per_child``
    and gunicorn's ``max_requests`` recycle theirs."""
    if not limit_mib:
        return False
    rss = resident_mib()
    if rss is None or rss <= limit_mib:
        return False
    log.info(fields(event="worker.recycling", slot=slot, pid=os.getpid(), rss_mib=round(rss),
                    limit_mib=round(limit_mib)))
    return True
