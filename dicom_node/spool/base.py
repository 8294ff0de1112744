"""The spool interface: where received photos and encoded results wait between the stages.

Why an interface: today the spool is a directory on the node's own disk
(:class:`~dicom_node.spool.local.LocalSpool`); several nodes sharing one queue need one spool
they all reach (a shared file system, an object store). Whatever the medium, the stages rely on
the same promises:

* a write is durable and atomic when it returns: the object is there whole, or not at all, so a
  half-written photo never becomes a job and a half-written result is never sent;
* the job store records only the *relative* path a write returns, so moving the spool's root (or
  mounting it elsewhere on another node) keeps every job valid;
* photos get names the spool chooses, never the SOP Instance UID a peer sent (not trusted as a path).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
    def write_result(self, job_id: int, kind: str, dataset: Dataset) -> str:
        """Store one result object of a job as DICOM Part 10; return its relative path."""

    @abstractmethod
    def discard(self, relative: str) -> None:
        """Remove an object that no job refers to (a duplicate, a failed commit)."""
