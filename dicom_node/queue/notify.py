"""Doorbells across nodes: PostgreSQL's LISTEN/NOTIFY rings every node's local bells (issue 16).

The local doorbells (:mod:`dicom_node.queue.doorbell`) are semaphores of one machine: a photo
received by node A wakes A's workers at once, but node B's idle workers see it only at their next
poll of the shared store. With the PostgreSQL store the transactions that make work for another
stage also say so on a channel (delivered by the server when they commit, never before, and not at
all when they roll back):

* ``dicom_node_received``: :meth:`~dicom_node.queue.postgres_store.PostgresJobStore.add_received`
  committed a new job (intake -> workers);
* ``dicom_node_results``: :meth:`~dicom_node.queue.postgres_store.PostgresJobStore.finish_encoding`
  committed a job's results (workers -> dispatch).

Each node runs one :class:`NotifyListener`: a thread with its own connection (autocommit, ``LISTEN``
on both channels) that rings the node's ``photo_received`` or ``results_ready`` bell once per
notification. The ring carries no job, as a local ring does not: the stage that hears it claims
from the store, and a notification for work another node claimed first costs one empty look.

Polling stays the safety net: a notification is lost when this listener is not connected (the
server restarting, the network gone), so after every reconnection both bells are rung once, and
every stage keeps polling at its ``poll_interval_s`` whatever happens here. An outage is one
WARNING line (``event=job_store.listener_lost``) and its end one INFO line
(``event=job_store.listener_back``); between them the listener tries again with a growing pause.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg

from dicom_node.config import mask_url
from dicom_node.logs import fields
from dicom_node.queue.doorbell import Doorbell, Doorbells

log = logging.getLogger("dicom_node.jobs")

CHANNEL_RECEIVED = "dicom_node_received"  # NOTIFYed by add_received: a new job is committed
CHANNEL_RESULTS = "dicom_node_results"  # NOTIFYed by finish_encoding: a job's results are committed

WAIT_S = 0.2  # the longest one wait for notifications lasts: how soon the thread sees a stop
RECONNECT_INITIAL_S = 0.25  # the first pause after a lost connection; doubled after each failed try
RECONNECT_MAX_S = 5.0  # the longest pause between tries (polling carries the work meanwhile)
CONNECT_TIMEOUT_S = 5  # unless the URL says otherwise: a dead host must not hold up a stop for long
# TCP keepalives, unless the URL says otherwise: a server that vanished without closing the connection
# (a pulled cable, a failed-over VM) is noticed within ~idle + interval x count seconds, not hours later.
KEEPALIVE_DEFAULTS: dict[str, str | int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}

_Connection = psycopg.Connection[tuple[Any, ...]]


class NotifyListener:
    """Rings this node's doorbells for work committed by any node sharing the PostgreSQL store.

    :meth:`start` connects once before it returns (so work committed after a node says "started"
    is announced to it) and then listens on a daemon thread; when that first connection fails
    the thread keeps trying. :meth:`stop` ends the thread within about :data:`WAIT_S`.
    """

    def __init__(self, url: str, doorbells: Doorbells, *, reconnect_initial_s: float = RECONNECT_INITIAL_S,
                 reconnect_max_s: float = RECONNECT_MAX_S) -> None:
        """``url``: the job store's (``[job_store] url``), the password masked in every log line."""
        self.url_for_logs = mask_url(url)
        given = psycopg.conninfo.conninfo_to_dict(url)
        defaults: dict[str, str | int] = {"connect_timeout": CONNECT_TIMEOUT_S,
                                          "application_name": "dicom-node-listener", **KEEPALIVE_DEFAULTS}
        self._conninfo = psycopg.conninfo.make_conninfo(
            url, **{key: value for key, value in defaults.items() if key not in given})
        self._bells: dict[str, Doorbell] = {CHANNEL_RECEIVED: doorbells.photo_received,
                                            CHANNEL_RESULTS: doorbells.results_ready}
        self.reconnect_initial_s, self.reconnect_max_s = reconnect_initial_s, reconnect_max_s
        self._db: _Connection | None = None  # used by the listening thread only (and start() before it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_since: float | None = None  # monotonic time of the outage's start; None: connected
        self.notifications = 0  # rung so far (for tests and the bench)
        self.reconnections = 0  # outages ended so far

    @property
    def connected(self) -> bool:
        return self._lost_since is None and self._db is not None

    def start(self) -> None:
        self._try_connect()
        self._thread = threading.Thread(target=self._run, name="job-store-listener", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():  # stuck connecting to a dead host (connect_timeout): a daemon, left to end
                log.warning(fields(event="job_store.listener_stop_slow", url=self.url_for_logs))
                return
        self._close()

    # ------------------------------------------------------------------ internals

    def _run(self) -> None:
        pause_s = self.reconnect_initial_s
        while not self._stop.is_set():
            db = self._db
            if db is None:
                if self._stop.wait(pause_s):
                    break
                pause_s = min(pause_s * 2, self.reconnect_max_s)
                if self._try_connect():
                    pause_s = self.reconnect_initial_s
                continue
            try:
                for notification in db.notifies(timeout=WAIT_S):
                    bell = self._bells.get(notification.channel)
                    if bell is not None:
                        bell.ring()
                        self.notifications += 1
                    if self._stop.is_set():
                        break
            except psycopg.Error as exc:  # the server restarted or went away, the connection broke
                self._close()
                self._lost(exc)
            except Exception:  # a bug here must not end the thread: polling covers the work meanwhile
                log.exception(fields(event="job_store.listener_error", url=self.url_for_logs))
                self._close()
                self._lost(None)
        self._close()

    def _try_connect(self) -> bool:
        """Connect and LISTEN; True on success. A failure starts an outage (logged once) or continues it."""
        try:
            db = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            self._lost(exc)
            return False
        try:
            for channel in self._bells:
                db.execute(f"LISTEN {channel}")
        except psycopg.Error as exc:
            db.close()
            self._lost(exc)
            return False
        self._db = db
        if self._lost_since is not None:
            log.info(fields(event="job_store.listener_back", url=self.url_for_logs,
                            after_s=f"{time.monotonic() - self._lost_since:.1f}"))
            self._lost_since = None
            self.reconnections += 1
            # What was committed while nobody listened was announced to nobody: every stage looks now.
            for bell in self._bells.values():
                bell.ring()
        return True

    def _lost(self, exc: BaseException | None) -> None:
        if self._lost_since is not None:
            return  # the same outage: said once
        self._lost_since = time.monotonic()
        reason = f"{type(exc).__name__}: {str(exc).strip()}" if exc is not None else "listener error"
        log.warning(fields(event="job_store.listener_lost", url=self.url_for_logs, reason=reason,
                           retry=f"every {self.reconnect_initial_s:g}-{self.reconnect_max_s:g} s",
                           meanwhile="the stages poll the store"))

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except psycopg.Error:
                pass
