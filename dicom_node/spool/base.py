"""The spool interface: where received photos and encoded results wait between the stages.

Why an interface: today the spool is a directory on the node's own disk
(:class:`~dicom_node.spool.local.LocalSpool`); several nodes sharing one queue need one spool
they all reach (a shared file system, an object store). Whatever the medium, the stages rely on
the same promises:

* a write is durable and atomic when it returns: the object is there whole, or not at all, so a
  half-written photo never becomes a job and a half-written result is never sent;
* the job store records only the *relative* path a write returns, so moving the spool's root (or
  mounting it elsewhere on another node: ``spool_dir``) keeps every job valid;
* several nodes may share one spool (issue 16): no two writers ever write one name, and what a
  start-up or the orphan sweep removes is old enough not to be another node's write in progress;
* photos get names the spool chooses, never the SOP Instance UID a peer sent (not trusted as a path);
* the retention stage deletes a job's files only through this interface, and only what no live
  job refers to, so the spool's layout stays the spool's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.spool.atomic import Chunks


class Spool(ABC):
    """Durable storage of received photos and encoded results, addressed by relative paths."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the spool usable and remove what a crash left half-written."""

    @abstractmethod
    def path(self, relative: str) -> Path:
        """A local path to read the object at ``relative`` from."""

    @abstractmethod
    def write_photo(self, part10: bytes | Chunks) -> str:
        """Store a received photo (DICOM Part 10 bytes, or its pieces in order) under a fresh
        name; return its relative path."""

    @abstractmethod
    def write_result(self, job_id: int, kind: str, dataset: Dataset, attempt: int | None = None) -> str:
        """Store one result object of a job as DICOM Part 10; return its relative path.

        ``attempt`` (the job's processing attempt) goes into the name: a worker that took a job
        over never writes the file a stale holder of an earlier attempt may still be writing, so the
        file a record names is the one its SOP Instance UID was recorded from."""

    @abstractmethod
    def discard(self, relative: str) -> None:
        """Remove an object that no job refers to (a duplicate, a failed commit)."""

    # ------------------------------------------------------------------ retention

    @abstractmethod
    def delete_job_files(self, job_id: int, photo_path: str, result_paths: Sequence[str]) -> FileTally:
        """Delete one job's photo and every result object it has (recorded or half-made).
        A file already gone is not an error: a crash may have come between mark and delete."""

    @abstractmethod
    def job_files(self, job_id: int, photo_path: str) -> FileTally:
        """How many files and bytes one job's photo and results hold now (nothing for what is gone)."""

    @abstractmethod
    def usage_bytes(self) -> int:
        """Bytes of every file in the spool (what ``retention.max_spool_gb`` bounds)."""

    @abstractmethod
    def sweep_orphans(self, photos_in_use: Collection[str], jobs_in_use: Collection[int],
                      older_than: float) -> list[OrphanFile]:
        """Delete files no job refers to and that were last written before ``older_than`` (epoch s):
        photos no job names (a commit that failed after the write), results of jobs that no longer
        hold files, temporary files a crash left. ``photos_in_use`` are relative paths of photos and
        ``jobs_in_use`` ids of jobs whose files must stay. The age limit keeps what is being written
        now: a photo is written before its job is committed, a result before it is recorded."""


@dataclass(frozen=True)
class FileTally:
    """Files and their bytes: what one job holds, or what one deletion freed."""

    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class OrphanFile:
    """A file the orphan sweep deleted: its relative path, size, and the job its directory names, if any."""

    path: str
    bytes: int
    job_id: int | None = None
