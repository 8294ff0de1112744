"""The worker pool: ``worker.count`` worker processes, kept alive.

* A worker that dies is restarted, after a delay that doubles while deaths keep coming (up to
  ``worker.max_restart_delay_s``); the job it held goes back to the queue, or ends FAILED once it
  has cost ``worker.max_attempts`` workers (a photo that crashes the decoder must not do so forever).
* No worker is started while ``model_dir`` lacks a model (the node started without one, or it is
  still downloading): the node says "no model" and how to install it, and starts the workers the
  moment both files are there.
* A worker whose resident size passed ``worker.recycle_rss_mib`` after a job exits with a code of
  its own and is replaced at once: no death, no backoff, no attempt charged.
* A worker that cannot load the model exits with a code of its own; the model is tried again every
  ``worker.model_retry_interval_s``, or at once when the files change (an administrator fixing them
  needs no restart).
* Either way the node is marked not ready (see :mod:`dicom_node.monitor.health`) while processing is impossible;
  intake is not affected.

No job stays held by a worker that is gone:

* releasing a dead worker's jobs is a write to the job store, and whatever killed the worker (a
  full disk, say) may break it too. A release that fails is kept and tried again on every monitor
  tick until it lands (ERROR once per outage, INFO when it lands);
* every ``worker.sweep_interval_s`` a sweep returns PARSING/ENCODING jobs held by this node's
  workers that are no longer any live slot's current owner (only worker processes hold jobs in
  those states), charged as a worker death. A live worker's job is never touched: it hands its
  job back itself, retrying as long as it must (see :mod:`dicom_node.pipeline.processor`).

Both act for this node's own workers. A whole node that dies leaves no supervisor behind: its
workers' processing leases (``worker.lease_s``) run out instead, and any node sharing the job
store takes those jobs over with its next claim (see :meth:`JobStore.claim_for_processing`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from dicom_node.logs import fields
from dicom_node.model.presence import Signature, model_signature, no_model_message
from dicom_node.monitor.health import Health
from dicom_node.monitor.metrics import WORKER_DIED, WORKER_NO_MODEL, WORKER_RECYCLED, StageMetrics
from dicom_node.pipeline.lesion import expire_waiting
from dicom_node.pipeline.worker import (
    EXIT_MODEL_UNAVAILABLE,
    EXIT_RECYCLE,
    MessageKind,
    WorkerMessage,
    WorkerSetup,
    worker_main,
)
from dicom_node.queue.doorbell import Doorbells, join_ringing
from dicom_node.queue.job import PROCESSING_STATES, Job
from dicom_node.queue.owners import node_owners, worker_owner
from dicom_node.queue.store import JobStore

log = logging.getLogger(__name__)

DEATH_WINDOW_S = 300.0  # deaths counted for readiness and restart delays
MONITOR_INTERVAL_S = 0.2
STOP_GRACE_S = 10.0  # a worker finishing its photo gets this long before it is killed
PROBLEM_MODEL = "model"
PROBLEM_WORKERS = "workers"
SWEEP_REASON = "the worker holding this job is gone (found by the sweep)"


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    messages: Connection | None = None  # read end of this worker's message pipe
    owner: str = ""
    generation: int = 0
    next_start: float = 0.0
    deaths: deque[float] = field(default_factory=deque)
    loading: Signature | None = None  # the model files as they were when this slot's worker started
    failed_model: Signature | None = None  # the files its last load failed on; others are tried at once


@dataclass
class _PendingRelease:
    """A gone worker's jobs whose release could not be written yet."""

    owner: str
    reason: str
    since: float  # time.monotonic() of the first failed try
    charge: bool = True  # counted as an attempt of the jobs (False: a recycled worker's)


class WorkerPool:
    """Starts, watches and restarts the worker processes of one node."""

    def __init__(self, setup: WorkerSetup, node_id: str, store: JobStore, health: Health, metrics: StageMetrics,
                 doorbells: Doorbells) -> None:
        """``setup`` goes to every worker process; ``node_id`` names their owners."""
        self.setup = setup
        self.settings = setup.settings
        self.node_id = node_id
        self.metrics = metrics
        self.doorbells = doorbells
        self.store = store
        self.health = health
        self._ctx = multiprocessing.get_context("spawn")  # no fork: the node process runs threads
        # Never written: closing our end (or dying) tells every worker to stop (see worker.py).
        self._stop_read, self._stop_write = self._ctx.Pipe(duplex=False)
        self._stopping = threading.Event()
        self._workers_gone = threading.Event()  # set by stop() once every worker has exited
        self._lock = threading.Lock()
        self._slots = [_Slot(index=i) for i in range(setup.settings.count)]
        self._thread: threading.Thread | None = None
        self._pending_releases: dict[str, _PendingRelease] = {}  # by owner; monitor thread only
        self._release_outage = False  # a release failed and not all have landed since: ERROR logged
        self._next_sweep = time.monotonic() + setup.settings.sweep_interval_s
        self._model: Signature | None = None  # the model files as last seen; monitor thread only
        self._model_looked = False
        self._model_missing = False  # said "no model" since the start (so a model that appears is news)

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None and s.process.is_alive()
                and s.process.pid is not None]

    def start(self) -> None:
        if not self._slots:
            self.health.set_problem(PROBLEM_WORKERS, "worker.count is 0: photos are queued but never processed")
        else:
            self.health.set_problem(PROBLEM_MODEL, "the workers are loading the model", log_now=False)
            self._look_at_model()  # "no model" from the first answer of /readyz on (the thread is not started yet)
        self._thread = threading.Thread(target=self._monitor, name="worker-pool", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask workers to finish their current photo, then kill what is still running.

        The monitor thread (which spawned the workers) ends last: Linux's parent-death signal
        follows the spawning thread, and would kill the workers mid-photo otherwise."""
        with self._lock:
            self._stopping.set()
            self._stop_write.close()
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in self._slots:
            process = slot.process
            if process is not None:
                # an idle worker waits on the bell: it wakes and sees the closed pipe
                join_ringing(process, self.doorbells.photo_received, deadline, 0.1)
                if process.is_alive():
                    log.warning(fields(event="worker.killed", slot=slot.index, pid=process.pid,
                                       reason="did not stop in time"))
                    process.kill()
                    process.join(timeout=5)
        self._workers_gone.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for slot in self._slots:
            if slot.messages is not None:
                slot.messages.close()

    # ------------------------------------------------------------------ monitoring

    def _start_slot(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.loading = self._model
        slot.owner = worker_owner(self.node_id, slot.index, slot.generation)
        if slot.messages is not None:
            slot.messages.close()
        messages_read, messages_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=worker_main,
            args=(self.setup, slot.index, slot.owner, messages_write, self._stop_read, os.getpid(), self.doorbells),
            name=f"dicom-node-worker-{slot.index}",
            daemon=True,
        )
        with self._lock:
            if self._stopping.is_set():
                return
            process.start()
        messages_write.close()  # the worker holds it now; EOF tells us it is gone
        slot.messages = messages_read
        slot.process = process
        self.health.set_worker(f"worker-{slot.index}", pid=process.pid, state="starting", owner=slot.owner)
        log.info(fields(event="worker.spawned", slot=slot.index, pid=process.pid, generation=slot.generation))

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain_messages()
                now = time.monotonic()
                self._look_at_model()
                for slot in self._slots:
                    self._check_slot(slot, now)
                self._retry_releases()
                if now >= self._next_sweep:
                    self._next_sweep = now + self.settings.sweep_interval_s
                    self._sweep()
                self._update_readiness(now)
            except Exception:  # the supervisor must outlive its own bugs
                log.exception(fields(event="worker_pool.error"))
            self._stopping.wait(MONITOR_INTERVAL_S)
        # This thread spawned the workers, and Linux's parent-death signal (SIGKILL, see
        # lifetime.py) follows the spawning *thread*: returning now would kill a worker still
        # finishing its photo or unloading its runtime. Stay until stop() has seen them exit.
        self._workers_gone.wait(STOP_GRACE_S + 10)

    def _drain_messages(self) -> None:
        for slot in self._slots:
            while slot.messages is not None:
                try:
                    if not slot.messages.poll(0):
                        break
                    message: WorkerMessage = slot.messages.recv()
                except (EOFError, OSError):  # the worker exited; _check_slot handles that
                    slot.messages.close()
                    slot.messages = None
                    break
                self._handle(message)

    def _handle(self, message: WorkerMessage) -> None:
        name = f"worker-{message.slot}"
        if message.kind == MessageKind.READY:
            self.health.set_worker(name, pid=message.pid, state="ready", model=message.detail)
            self.health.clear_problem(PROBLEM_MODEL)
        elif message.kind == MessageKind.PARSED:
            self.metrics.observe_parse(float(message.detail))
        elif message.kind == MessageKind.MODEL_ERROR:
            self.health.set_worker(name, pid=message.pid, state="no model", reason=message.detail)
            self.health.set_problem(PROBLEM_MODEL, f"the model in {self.setup.model_dir} cannot be loaded: "
                                                   f"{message.detail}")

    def _check_slot(self, slot: _Slot, now: float) -> None:
        process = slot.process
        if process is not None and not process.is_alive():
            process.join(timeout=0)
            code = process.exitcode
            slot.process = None
            if self._stopping.is_set():
                return
            self.metrics.worker_exited({EXIT_MODEL_UNAVAILABLE: WORKER_NO_MODEL, EXIT_RECYCLE: WORKER_RECYCLED}
                                       .get(code or 0, WORKER_DIED))
            if code == EXIT_MODEL_UNAVAILABLE:
                slot.next_start = now + self.settings.model_retry_interval_s
                slot.failed_model = slot.loading
                self.health.set_worker(f"worker-{slot.index}", pid=None, state="waiting for the model")
            elif code == EXIT_RECYCLE:
                self._recycled(slot, now)
            else:
                self._record_death(slot, code, now)
        if slot.process is not None or self._stopping.is_set() or self._model is None:
            return
        # A slot that could not load the model starts again as soon as the model changes; any other
        # death waits out its restart delay (a new model file is no reason to skip the backoff).
        model_changed = slot.failed_model is not None and slot.failed_model != self._model
        if now >= slot.next_start or model_changed:
            slot.failed_model = None
            self._start_slot(slot)

    def _look_at_model(self) -> None:
        """Follow the model files: none means "no model" (loudly, with the fix); files that appear
        or change are loaded by the next start of each waiting slot (:meth:`_check_slot`)."""
        model = model_signature(self.setup.model_dir)
        if model == self._model and self._model_looked:
            return
        self._model_looked = True
        if model is None:
            self._model_missing = True
            self.health.set_problem(PROBLEM_MODEL, no_model_message(self.setup.model_dir))
            for slot in self._slots:
                self.health.set_worker(f"worker-{slot.index}", pid=None, state="waiting for a model")
        elif self._model_missing:
            self._model_missing = False
            log.info(fields(event="model.found", model_dir=self.setup.model_dir))
            self.health.set_problem(PROBLEM_MODEL, "the workers are loading the model", log_now=False)
        self._model = model

    def _recycled(self, slot: _Slot, now: float) -> None:
        """A worker that outgrew ``worker.recycle_rss_mib`` left between jobs: no death, no backoff,
        a fresh one at once. It held no job; should it have, the job goes back uncharged."""
        released = self._release(slot.owner, f"worker {slot.index} recycled", charge=False)
        slot.next_start = now
        log.info(fields(event="worker.recycled", slot=slot.index,
                        released_jobs=len(released) if released is not None else "pending"))
        self.health.set_worker(f"worker-{slot.index}", pid=None, state="restarting", last_exit_code=EXIT_RECYCLE)

    def _record_death(self, slot: _Slot, code: int | None, now: float) -> None:
        reason = f"worker {slot.index} died (exit code {code})"
        released = self._release(slot.owner, reason)
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > DEATH_WINDOW_S:
            slot.deaths.popleft()
        cfg = self.settings
        delay = min(cfg.max_restart_delay_s, cfg.restart_delay_s * 2 ** (len(slot.deaths) - 1))
        slot.next_start = now + delay
        log.error(fields(event="worker.died", slot=slot.index, exit_code=code,
                         released_jobs=len(released) if released is not None else "pending",
                         restart_in_s=f"{delay:.1f}"))
        self.health.set_worker(f"worker-{slot.index}", pid=None, state="restarting", last_exit_code=code)

    # ------------------------------------------------------------------ releasing a gone worker's jobs

    def _release(self, owner: str, reason: str, charge: bool = True) -> list[Job] | None:
        """Release what ``owner`` (a gone worker) holds, charged as a worker death unless ``charge`` is
        False. None when the job store refused the write: the release is then kept and retried on
        every monitor tick."""
        try:
            released = self.store.release_owner(owner, reason, self.settings.max_attempts, charge=charge)
        except Exception as exc:  # disk full, store locked: its jobs must not stay held for good
            self._pending_releases.setdefault(owner, _PendingRelease(owner, reason, time.monotonic(), charge))
            self._release_failed(exc)
            return None
        self._pending_releases.pop(owner, None)
        return released

    def _release_failed(self, exc: Exception) -> None:
        if self._release_outage:
            return  # logged once per outage, not every tick
        self._release_outage = True
        log.error(fields(event="worker.release_failed", reason=f"{type(exc).__name__}: {exc}",
                         owners=len(self._pending_releases), retry="every monitor tick until it is written"))

    def _retry_releases(self) -> None:
        for pending in list(self._pending_releases.values()):
            released = self._release(pending.owner, pending.reason, pending.charge)
            if released is None:
                return  # the store still refuses; next tick
            log.info(fields(event="worker.jobs_released", owner=pending.owner, released_jobs=len(released),
                            after_s=f"{time.monotonic() - pending.since:.1f}"))
        self._release_outage = False

    def _expire_lesion_jobs(self) -> None:
        """Fail lesion jobs that waited for their photo longer than ``lesion.wait_for_photo_h``
        (issue 15): part of the sweep, because nothing else looks at a job nobody can claim."""
        lesion = self.setup.lesion
        if lesion is None or not lesion.enabled:
            return
        try:
            failed = expire_waiting(self.store, lesion)
        except Exception as exc:  # the next sweep tries again
            log.warning(fields(event="lesion.expiry_failed", reason=f"{type(exc).__name__}: {exc}"))
            return
        for job in failed:
            log.warning(fields(event="lesion.photo_never_came", job=job.id, sop=job.sop_instance_uid,
                               photo=job.source_uid, reason=job.reason))

    def _sweep(self) -> None:
        """Release processing jobs held by this node's workers that are no longer a live slot's
        current owner. A slot whose process is not yet reaped still counts as live: its death is
        recorded (and its jobs released) by :meth:`_check_slot`. Then fail lesion jobs whose
        photo did not come in time."""
        if self._stopping.is_set():
            return
        self._expire_lesion_jobs()
        live = {slot.owner for slot in self._slots if slot.process is not None}
        try:
            held = self.store.held_jobs(node_owners(self.node_id), PROCESSING_STATES)
        except Exception as exc:  # a read failing: the next sweep looks again
            log.warning(fields(event="worker.sweep_failed", reason=f"{type(exc).__name__}: {exc}"))
            return
        gone = sorted({job.owner for job in held if job.owner is not None and job.owner not in live})
        for owner in gone:
            if owner in self._pending_releases:
                continue  # already retried every tick
            released = self._release(owner, SWEEP_REASON)
            if released:
                log.warning(fields(event="worker.sweep_released", owner=owner, released_jobs=len(released),
                                   jobs=",".join(str(job.id) for job in released)))

    def _update_readiness(self, now: float) -> None:
        if not self._slots:
            return
        for slot in self._slots:
            while slot.deaths and now - slot.deaths[0] > DEATH_WINDOW_S:
                slot.deaths.popleft()
        deaths = sum(len(s.deaths) for s in self._slots)
        if deaths >= self.settings.deaths_before_not_ready:
            self.health.set_problem(PROBLEM_WORKERS, f"workers keep dying ({deaths} deaths in the last "
                                                     f"{DEATH_WINDOW_S / 60:.0f} minutes)")
        else:
            self.health.clear_problem(PROBLEM_WORKERS)
