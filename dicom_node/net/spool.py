"""The spool: received photos and encoded results on disk, each written atomically.

Atomic means: write a temporary file in the same directory, flush, fsync, rename over the final
name, fsync the directory. After a crash a path either holds the whole object or does not exist;
a half-written photo can never become a job, nor a half-written result be sent. Photos get a
random file name (never the SOP Instance UID a peer chose: it is not trusted as a path).
"""

from __future__ import annotations

import os
import secrets
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

PHOTOS = "photos"
RESULTS = "results"
_TMP_PREFIX = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that the path holds all of it or nothing, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class Spool:
    """Files under ``<data_dir>/spool``; paths handed to the job store are relative to ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "spool"

    def prepare(self) -> None:
        """Create the directories and remove temporary files a crash left behind."""
        for sub in (PHOTOS, RESULTS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for tmp in self.root.rglob(f"{_TMP_PREFIX}*"):
            try:
                tmp.unlink()
            except OSError:
                pass

    def path(self, relative: str) -> Path:
        return self.data_dir / relative

    def write_photo(self, part10: bytes) -> str:
        """Spool a received photo (DICOM Part 10 bytes) under a fresh name; return its relative path."""
        name = f"{secrets.token_hex(16)}.dcm"
        target = self.root / PHOTOS / name[:2] / name
        atomic_write(target, part10)
        return str(target.relative_to(self.data_dir))

    def write_result(self, job_id: int, kind: str, dataset: Dataset) -> str:
        """Spool one result object of a job as DICOM Part 10; return its relative path."""
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        target = self.root / RESULTS / str(job_id) / f"{kind}.dcm"
        atomic_write(target, buffer.getbuffer())
        return str(target.relative_to(self.data_dir))

    def discard(self, relative: str) -> None:
        """Remove a spooled file that no job refers to (a duplicate, a failed commit)."""
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            pass
