"""``dicom-node serve``: the stages wired together.

    intake (intake.scp) -> job store (queue) -> workers (pipeline) -> job store -> dispatch -> PACS

This is the one module that knows every room: it hands each stage its own section of the
configuration, the shared job store, spool, metrics and doorbells, and mounts the web side on top.

Each stage talks to the others only through the job store and the spool, so each can stop and
restart on its own, and at start every job an earlier run left mid-way (received, parsing,
encoding, dispatching) simply continues: processing jobs held by this node's dead workers go back
to the queue, dispatch leases are dropped, due retries run.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from dicom_node.allocator import NODE as NODE_THRESHOLDS
from dicom_node.allocator import keep_freed_memory
from dicom_node.config import NodeConfig
from dicom_node.dispatch.dispatcher import Dispatcher
from dicom_node.intake.accept import Acceptor
from dicom_node.intake.scp import IntakeSCP
from dicom_node.intake.watermark import DiskWatermark
from dicom_node.logs import fields
from dicom_node.model.presence import BackgroundFetch, model_signature
from dicom_node.monitor.health import Health
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.monitor.notify import notify
from dicom_node.monitor.readiness import (
    Check,
    Readiness,
    disk_watermark_check,
    health_model_check,
    job_store_check,
    listener_check,
)
from dicom_node.net.tls import TlsFilesError, client_context
from dicom_node.pipeline.routing import Router
from dicom_node.pipeline.supervisor import WorkerPool
from dicom_node.pipeline.worker import WorkerSetup
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.factory import open_job_store
from dicom_node.queue.job import JobState
from dicom_node.queue.owners import node_owners
from dicom_node.queue.store import JobStore
from dicom_node.retention.cleaner import Cleaner
from dicom_node.spool.local import LocalSpool
from dicom_node.web.mount import node_app
from dicom_node.web.server import HttpServer

if TYPE_CHECKING:
    from dicom_node.queue.notify import NotifyListener

log = logging.getLogger("dicom_node.node")

EXIT_OK = 0
EXIT_CANNOT_START = 1


class NodeStartError(RuntimeError):
    """The node cannot start; the message tells the administrator what to do."""


def recover(config: NodeConfig, store: JobStore) -> list[int]:
    """Release what this node held when it last stopped, so every interrupted job resumes.

    Not charged as an attempt: a node-wide stop (crash, power cut, restart) says nothing about the
    photo. A photo that kills its worker while the node lives is charged by the worker pool."""
    released = store.release_owner(node_owners(config.node_id), "the node stopped while this job was in progress",
                                   config.worker.max_attempts, charge=False)
    counts = store.counts()
    log.info(fields(event="node.recovered", released=len(released),
                    **{state.value: counts[state] for state in JobState if counts[state]}))
    return [job.id for job in released]


def worker_setup(config: NodeConfig) -> WorkerSetup:
    """What each worker process is given: its section, and what decode, routing and encode need."""
    return WorkerSetup(
        settings=config.worker,
        model_dir=config.model_dir,
        job_db_path=config.job_db_path,
        data_dir=config.data_dir,
        spool_dir=config.spool_dir,
        log_level=config.log_level,
        router=Router(config.routing.rules, config.peers),
        limits=config.intake.decode_limits(),
        labels=config.results.encode_options(),
        log_format=config.log_format,
        lesion=config.lesion,
        job_store_url=config.job_store.url,
    )


class Node:
    """One running node: intake, workers, dispatch and health around one job store."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = LocalSpool(config.data_dir, config.spool_dir)
        self.store: JobStore | None = None
        self.health: Health | None = None
        self.intake: IntakeSCP | None = None
        self.workers: WorkerPool | None = None
        self.dispatcher: Dispatcher | None = None
        self.cleaner: Cleaner | None = None
        self.metrics: NodeMetrics | None = None
        self.http: HttpServer | None = None
        self.fetch: BackgroundFetch | None = None
        self.notify_listener: NotifyListener | None = None  # PostgreSQL store only (queue/notify.py)
        self._stopped = threading.Event()

    def start(self) -> None:
        config = self.config
        self.spool.prepare()
        store = self.store = open_job_store(config.job_db_path, config.job_store.url)
        recover(config, store)
        metrics = self.metrics = NodeMetrics(job_store=store)

        def waiting() -> int:
            counts = store.counts()
            return counts[JobState.RECEIVED] + counts[JobState.PARSING] + counts[JobState.ENCODING]

        # Nothing is written to health.json before the workers have said "loading the model":
        # a reader must never see a node that is ready before it can process anything.
        health = self.health = Health(config.health_path, config.worker.not_ready_log_interval_s, waiting)
        doorbells = new_doorbells()
        # one way to accept a photo, whichever door it comes in by: C-STORE here, STOW-RS on the HTTP port
        acceptor = Acceptor(config.intake, store, self.spool, metrics, doorbells.photo_received, config.lesion)
        intake = self.intake = IntakeSCP(config.listener, config.intake, config.peers, store, self.spool, metrics,
                                         doorbells.photo_received, acceptor=acceptor)
        metrics.count_open_associations(lambda: intake.open_associations)
        try:
            intake.start()
        except TlsFilesError as exc:
            store.close()
            raise NodeStartError(f"cannot start the DICOM TLS listener: {exc} ([tls] in the configuration)") from exc
        except OSError as exc:
            store.close()
            raise NodeStartError(f"cannot listen on {config.bind_address}:{config.port}: {exc.strerror or exc}. "
                                 "Is another node or PACS using that port?") from exc
        if config.http.enabled:
            app = node_app(config.http, config.model_dir, config.worker.runtime, store, self.readiness(), metrics,
                           acceptor=acceptor, peers=config.peers,
                           runtime_max_rss_mib=config.worker.runtime_max_rss_mib)
            self.http = HttpServer(app, config.http.bind_address, config.http.port)
            try:
                self.http.start()
            except OSError as exc:
                intake.stop()
                store.close()
                raise NodeStartError(f"cannot serve HTTP on {config.http.bind_address}:{config.http.port}: "
                                     f"{exc.strerror or exc}. Is another program using that port? "
                                     "(http.port, or http.enabled = false)") from exc
        job_store_url = config.job_store.url.get_secret_value() if config.job_store.url else None
        if job_store_url:  # a shared store: work committed by any node rings this node's bells too
            from dicom_node.queue.notify import NotifyListener  # psycopg is loaded only by who needs it

            self.notify_listener = NotifyListener(job_store_url, doorbells)
            self.notify_listener.start()
        self.workers = WorkerPool(worker_setup(config), config.node_id, store, health, metrics, doorbells)
        self.workers.start()
        health.set_info(ae_title=config.ae_title, port=intake.port, node_id=config.node_id,
                        http_port=self.http.port if self.http else None)
        self.dispatcher = Dispatcher(config.dispatch, config.peers, config.ae_title, config.node_id, store,
                                     self.spool, metrics, doorbells.results_ready)
        self.dispatcher.start()
        self.cleaner = Cleaner(config.retention, store, self.spool, metrics)
        self.cleaner.start()
        health.start()
        # No model is no reason not to receive: photos are queued, the workers (WorkerPool) say
        # "no model" until one is there and load it then, without a restart.
        if model_signature(config.model_dir) is None and config.auto_fetch_model:
            self.fetch = BackgroundFetch(config.model_dir)
            self.fetch.start()
        log.info(fields(event="node.started", ae_title=config.ae_title, address=config.bind_address,
                        port=intake.port, http_port=self.http.port if self.http else None,
                        workers=config.worker.count, data_dir=config.data_dir))

    def readiness(self) -> Readiness:
        """``/readyz``: the workers' model, the job store, the disk watermark, the DICOM port.

        The disk check reads intake's own watermark: ``/readyz`` is not ready exactly while intake
        answers 0xA700 for want of space (one source of truth)."""
        config = self.config
        checks: dict[str, Check] = {}
        if self.health is not None:
            checks["model"] = health_model_check(self.health)
        if self.store is not None:
            checks["job_store"] = job_store_check(self.store, config.data_dir)
        intake = self.intake
        watermark = (intake.watermark if intake is not None
                     else DiskWatermark.from_settings(config.spool_dir, config.intake))
        checks["disk_space"] = disk_watermark_check(watermark)
        where = f"{config.bind_address}:{intake.port if intake is not None else config.port}"
        checks["dicom_listener"] = listener_check(lambda: intake is not None and intake.listening, where)
        return Readiness(checks)

    def reload_tls(self) -> None:
        """Read the TLS certificates again (SIGHUP): intake swaps its context for new connections and
        keeps the old one when the new files are bad; the sending side reads its files for every send
        anyway, so here they are only checked, to put a broken file in the log now rather than at
        the next send."""
        if self.intake is not None:
            self.intake.reload_tls()
        for dest in self.config.destinations:
            if not dest.tls or dest.ca_certificates is None:
                continue
            try:
                client_context(dest.ca_certificates, dest.certificate, dest.private_key)
            except TlsFilesError as exc:
                log.error(fields(event="dispatch.tls_files_unusable", destination=dest.name, reason=str(exc)))
            else:
                log.info(fields(event="dispatch.tls_files_checked", destination=dest.name))

    def stop(self) -> None:
        """Stop intake first (peers keep what we no longer acknowledge), then workers and dispatch."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info(fields(event="node.stopping"))
        for stage in (self.fetch, self.http, self.intake, self.workers, self.dispatcher, self.cleaner, self.health,
                      self.notify_listener):
            if stage is not None:
                try:
                    stage.stop()
                except Exception:
                    log.exception(fields(event="node.stop_error", stage=type(stage).__name__))
        if self.store is not None:
            self.store.close()
        log.info(fields(event="node.stopped"))


def serve(config: NodeConfig) -> int:
    """Run the node until SIGTERM or SIGINT; SIGHUP re-reads the TLS certificates. Returns the exit code."""
    keep_freed_memory(NODE_THRESHOLDS)  # intake's 1 MB buffers: ~15 % more photos/s (allocator.py)
    try:
        node = Node(config)
        node.start()
    except NodeStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START

    stop = threading.Event()
    reload_requested = threading.Event()
    wake = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info(fields(event="node.signal", signal=signal.Signals(signum).name))
        stop.set()
        wake.set()

    def request_reload(signum: int, _frame: object) -> None:
        # only flagged here: the reload (file reads, logging) runs in the main loop, not in a signal handler
        reload_requested.set()
        wake.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # `kill -HUP <pid>` after renewing certificates: new TLS connections use them, open ones go on.
    signal.signal(signal.SIGHUP, request_reload)
    # `kill -USR1 <pid>` writes every thread's stack to the log: how to see where a node is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Type=notify: systemd starts units ordered after us only now, with both ports listening.
    notify(f"READY=1\nSTATUS=receiving on port {node.intake.port if node.intake else config.port}")
    try:
        while not stop.is_set():
            wake.wait(1.0)
            wake.clear()
            if reload_requested.is_set() and not stop.is_set():
                reload_requested.clear()
                log.info(fields(event="node.signal", signal="SIGHUP", action="reload TLS certificates"))
                node.reload_tls()
    finally:
        notify("STOPPING=1")
        started = time.monotonic()
        node.stop()
        log.info(fields(event="node.exit", shutdown_s=f"{time.monotonic() - started:.2f}"))
    return EXIT_OK
