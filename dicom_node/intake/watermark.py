"""The disk watermark: intake refuses a C-STORE before its photo could fill the data directory.

A full disk is the one failure that takes every stage down at once: the spool cannot take the
photo, SQLite cannot commit, results cannot be written. So intake keeps ``min_free_disk_mb`` free
for the stages behind it and answers 0xA700 (out of resources, PS3.4 B.2.3) *before* writing
anything: the sender keeps the object and sends it again later, and nothing acknowledged is lost.

* The incoming object's own size counts: a photo is taken only if the free space *after* it
  stays at the watermark. Objects being written on other associations at the same moment are
  reserved as well, so no number of parallel associations can write past it together.
* Hysteresis: once refusing, intake resumes only at ``min_free_disk_mb + resume_free_disk_mb``,
  so a sender retrying every few seconds does not make the node flap between full and not full.
* While refusing, an ERROR line (``event=intake.disk_low``) at most once a minute, and ``/readyz``
  says so (:func:`dicom_node.monitor.readiness.disk_watermark_check` reads this object: one
  source of truth for "is there room"). Intake resumes by itself when space comes back.

Free space is ``statvfs``'s blocks available to unprivileged users (``f_bavail``), the space
the node can really use whatever user it runs as; one system call per C-STORE.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import IntakeSettings
from dicom_node.logs import fields

log = logging.getLogger(__name__)

MB = 1_000_000  # the configuration's "mb" are decimal megabytes, as disk sizes are quoted
DISK_LOW_LOG_INTERVAL_S = 60.0


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged process may still write in the file system of ``path`` (OSError if unknown)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class DiskState:
    """Free space in the data directory and what intake does about it."""

    path: Path
    free_bytes: int
    reserved_bytes: int  # being written by open C-STOREs now
    min_free_bytes: int
    resume_free_bytes: int  # the free space at which a refusing intake resumes
    refusing: bool

    def describe(self) -> str:
        free = f"{self.free_bytes / MB:.0f} MB free in {self.path}"
        if self.refusing:
            return (f"{free}: intake refuses photos (0xA700) below {self.min_free_bytes / MB:.0f} MB and "
                    f"resumes at {self.resume_free_bytes / MB:.0f} MB")
        return f"{free} (intake refuses photos below {self.min_free_bytes / MB:.0f} MB)"


class Reservation:
    """Room held for one object while it is written; give it back with :meth:`release` (or ``with``)."""

    def __init__(self, watermark: DiskWatermark, nbytes: int) -> None:
        self._watermark = watermark
        self.nbytes = nbytes
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._watermark._release(self.nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DiskWatermark:
    """Admits an object only while the data directory keeps ``min_free_bytes`` free after it."""

    def __init__(self, path: str | os.PathLike[str], min_free_bytes: int, resume_extra_bytes: int = 0, *,
                 log_interval_s: float = DISK_LOW_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min_free_bytes < 0 or resume_extra_bytes < 0:
            raise ValueError("the disk watermark and its hysteresis cannot be negative")
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.resume_free_bytes = min_free_bytes + resume_extra_bytes
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._reserved = 0
        self._refusing = False
        self._last_log: float | None = None

    @classmethod
    def from_settings(cls, data_dir: str | os.PathLike[str], settings: IntakeSettings) -> DiskWatermark:
        """The watermark ``[intake]`` configures over ``data_dir`` (spool and job store)."""
        return cls(data_dir, settings.min_free_disk_mb * MB, settings.resume_free_disk_mb * MB)

    def free_bytes(self) -> int:
        """Bytes the node may still write in its data directory (raises OSError if it cannot tell)."""
        return free_bytes(self.path)

    @property
    def refusing(self) -> bool:
        return self._refusing

    def reserve(self, nbytes: int) -> Reservation | None:
        """Hold room for an object of ``nbytes``, or None when taking it would go below the watermark.

        Raises OSError when the free space cannot be read (the caller refuses then, too).
        """
        free = self.free_bytes()
        with self._lock:
            available = free - self._reserved
            if self._refusing and available >= self.resume_free_bytes:
                self._set_refusing(False, free)
            if not self._refusing and available - nbytes >= self.min_free_bytes:
                self._reserved += nbytes
                return Reservation(self, nbytes)
            self._set_refusing(True, free)
            return None

    def state(self) -> DiskState:
        """Read the free space now and update the refusal (how ``/readyz`` sees recovery without traffic)."""
        free = self.free_bytes()
        with self._lock:
            available = free - self._reserved
            if self._refusing and available >= self.resume_free_bytes:
                self._set_refusing(False, free)
            elif not self._refusing and available < self.min_free_bytes:
                self._set_refusing(True, free)
            elif self._refusing:
                self._log_low(free)
            return DiskState(self.path, free, self._reserved, self.min_free_bytes, self.resume_free_bytes,
                             self._refusing)

    # ------------------------------------------------------------------ internals (under the lock)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)

    def _set_refusing(self, refusing: bool, free: int) -> None:
        if refusing:
            if not self._refusing:
                self._refusing = True
                self._last_log = None  # say so at once
            self._log_low(free)
        elif self._refusing:
            self._refusing = False
            self._last_log = None
            log.warning(fields(event="intake.disk_ok", free_mb=round(free / MB), min_free_mb=self.min_free_bytes // MB,
                               path=self.path, reason="free space is back above the resume level: intake resumes"))

    def _log_low(self, free: int) -> None:
        now = self._clock()
        if self._last_log is not None and now - self._last_log < self.log_interval_s:
            return
        self._last_log = now
        log.error(fields(event="intake.disk_low", free_mb=round(free / MB), min_free_mb=self.min_free_bytes // MB,
                         resume_free_mb=self.resume_free_bytes // MB, path=self.path,
                         reason="C-STOREs are refused with 0xA700 until space is freed in the data directory"))
