"""Readiness: can the node process what it receives? Kept in memory and in ``<data_dir>/health.json``.

Intake keeps accepting whatever happens to processing (nothing received is lost), so the danger
is a node that quietly queues photos nobody will ever parse. When processing is impossible (the
model cannot load, workers keep dying, no worker is configured) the node is *not ready*: it logs
an ERROR line at once and every ``worker.not_ready_log_interval_s`` after that, and says so in the
health file, which ``dicom-node`` commands and a later health endpoint read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_node.logs import fields
from dicom_node.spool.atomic import atomic_write

log = logging.getLogger("dicom_node.health")  # the name log watchers and the tests match on


class Health:
    """Thread-safe readiness with named problems (key -> message); ready when there are none."""

    def __init__(self, path: Path | None, log_interval_s: float = 60.0,
                 waiting: Callable[[], int] | None = None) -> None:
        self.path = path
        self.log_interval_s = log_interval_s
        self._waiting = waiting
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._workers: dict[str, dict[str, Any]] = {}
        self._info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._problems

    @property
    def problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._problems)

    def set_problem(self, key: str, message: str, *, log_now: bool = True) -> None:
        """Mark the node not ready for ``key``. The ERROR line goes out at once unless ``log_now`` is
        False (an expected, short state such as loading the model: logged only if it lasts)."""
        with self._lock:
            changed = self._problems.get(key) != message
            self._problems[key] = message
        if changed:
            self._write()
            if log_now:
                self._wake.set()

    def clear_problem(self, key: str) -> None:
        with self._lock:
            cleared = self._problems.pop(key, None) is not None
            ready = not self._problems
        if cleared:
            log.info(fields(event="health.recovered", problem=key, ready=ready))
            self._write()

    def set_worker(self, name: str, **info: Any) -> None:
        with self._lock:
            self._workers[name] = info
        self._write()

    def set_info(self, **info: Any) -> None:
        with self._lock:
            self._info.update(info)
        self._write()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ready": not self._problems,
                "problems": dict(self._problems),
                "workers": {k: dict(v) for k, v in self._workers.items()},
                "pid": os.getpid(),
                "updated_at": time.time(),
                **self._info,
            }

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            atomic_write(self.path, json.dumps(self.snapshot(), indent=2).encode())
        except OSError as exc:
            log.warning(fields(event="health.unwritable", path=self.path, reason=str(exc)))

    # ------------------------------------------------------------------ the loud part

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._report, name="health-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _report(self) -> None:
        last_logged = time.monotonic()
        while not self._stop.is_set():
            problems = self.problems
            now = time.monotonic()
            if problems and (self._wake.is_set() or now - last_logged >= self.log_interval_s):
                self._wake.clear()
                last_logged = now
                waiting = None
                if self._waiting is not None:
                    try:
                        waiting = self._waiting()
                    except Exception:  # the store may be the problem; the line must still go out
                        waiting = None
                log.error(fields(
                    event="health.not_ready",
                    waiting_jobs=waiting,
                    problems="; ".join(f"{k}: {v}" for k, v in sorted(problems.items())),
                    note="photos are still accepted and queued, but not processed",
                ))
            elif not problems:
                self._wake.clear()
            self._wake.wait(timeout=min(1.0, self.log_interval_s))


def read_health(path: Path) -> dict[str, Any] | None:
    """The last health snapshot a node wrote, or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
