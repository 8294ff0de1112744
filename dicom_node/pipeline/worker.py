"""The worker process: load the model once, then claim and process jobs until told to stop.

A separate process, not a thread, because what can kill a worker (a decoder crashing on a hostile
file, the kernel killing a process that ran out of memory on a huge photo) must not take intake
down with it. The supervisor releases a dead worker's job and starts a new worker.

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
from dataclasses import dataclass
from multiprocessing.connection import Connection

from dicom_node.config import NodeConfig
from dicom_node.lifetime import die_with_parent
from dicom_node.logs import fields
from dicom_node.queue.doorbell import Doorbells, IdleWait

log = logging.getLogger(__name__)

EXIT_STOPPED = 0
EXIT_MODEL_UNAVAILABLE = 3  # the model cannot load: retrying at once would fail the same way


@dataclass(frozen=True)
class WorkerMessage:
    """What a worker tells the supervisor (through its own pipe)."""

    kind: str  # "ready", "model_error" or "parsed" (detail: the parse's seconds)
    slot: int
    pid: int
    detail: str


def torch_threads(config: NodeConfig) -> int:
    """Threads per worker: the configured number, else the CPU cores shared among the workers."""
    if config.worker.torch_threads:
        return config.worker.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, config.worker.count))


def _send(messages: Connection, message: WorkerMessage) -> None:
    try:
        messages.send(message)
    except (OSError, ValueError):  # the node is gone; the stop pipe ends us next
        pass


def worker_main(config: NodeConfig, slot: int, owner: str, messages: Connection, stop: Connection,
                parent_pid: int, doorbells: Doorbells | None = None) -> None:
    """Entry point of a worker process (spawned by :class:`~dicom_node.pipeline.supervisor.WorkerPool`)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node; it stops us in order
    from dicom_node.logs import setup_logging

    setup_logging(config.log_level)
    if os.getppid() != parent_pid:  # the node died while we were starting
        sys.exit(EXIT_STOPPED)

    from dicom_node.net.spool import Spool
    from dicom_node.parse.engine import HumanParser
    from dicom_node.pipeline.processor import PhotoProcessor
    from dicom_node.queue.job import JobState
    from dicom_node.queue.store import open_job_store

    parsed_states = (JobState.DISPATCHING, JobState.DONE)  # the photo was parsed (its parse_s is this run's)

    try:
        parser = HumanParser.from_model_dir(config.model_dir, threads=torch_threads(config),
                                            postprocess_mode=config.worker.postprocess,
                                            runtime=config.worker.runtime)
    except Exception as exc:  # ModelLoadError, a truncated file, out of memory: all mean "no model"
        _send(messages, WorkerMessage("model_error", slot, os.getpid(), f"{type(exc).__name__}: {exc}"))
        sys.exit(EXIT_MODEL_UNAVAILABLE)
    detail = f"model {parser.model_digest[:16]}{' (UNTRAINED)' if parser.untrained else ''}"
    _send(messages, WorkerMessage("ready", slot, os.getpid(), detail))

    store = open_job_store(config)
    processor = PhotoProcessor(config, store, Spool(config.data_dir), parser, owner)
    poll_s = config.worker.poll_interval_s
    idle = IdleWait(doorbells.photo_received, poll_s) if doorbells is not None else None
    log.info(fields(event="worker.started", slot=slot, pid=os.getpid(), owner=owner))
    try:
        # The stop pipe is readable only at EOF: the node closed its end, or died.
        while os.getppid() == parent_pid and not stop.poll(0):
            try:
                job = store.claim_for_processing(owner)
            except Exception as exc:  # the store is busy or unreachable: wait, do not die
                log.error(fields(event="worker.claim_failed", slot=slot, reason=f"{type(exc).__name__}: {exc}"))
                stop.poll(max(poll_s, 1.0))
                continue
            if job is None:
                if idle is not None:  # the pool rings it after closing the stop pipe, too
                    idle.nothing_to_do()
                else:
                    stop.poll(poll_s)
                continue
            if idle is not None:
                idle.found_work()
            finished = processor.run(job)
            if doorbells is not None and finished is not None and finished.state == JobState.DISPATCHING:
                doorbells.results_ready.ring()
            if finished is not None and finished.parse_s is not None and finished.state in parsed_states:
                _send(messages, WorkerMessage("parsed", slot, os.getpid(), repr(finished.parse_s)))
    finally:
        store.close()
        log.info(fields(event="worker.stopped", slot=slot, pid=os.getpid()))
    sys.exit(EXIT_STOPPED)
