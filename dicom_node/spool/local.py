"""The spool as a directory: ``<data_dir>/spool`` on this node's disk (the embedded default), or
``spool_dir`` on a file system the nodes of a group share (issue 16).

Job records name spooled files ``spool/photos/..`` and ``spool/results/<job id>/..``, whatever the
spool's root: the ``spool/`` prefix is resolved under ``spool_dir``. So a store written before
``spool_dir`` existed keeps working, and every node of a group, each mounting the shared file
system wherever it likes, resolves a record's path to the same file.

What a shared file system must give for that (NFSv4, CephFS, SMB 3 do): a rename within a directory
is atomic and seen whole by every client, fsync of a file and of a directory is honoured (durable
on the server when it returns), and close-to-open consistency (a file renamed into place and closed
on one node is read whole by another that opens it afterwards). Files are named so that no two
writers ever share a name: photos by a random token, results by job id (unique in the shared job
store) and attempt (a take-over's new attempt never writes over what a stale holder may still be
writing).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Collection, Iterator, Sequence
from io import BytesIO
from pathlib import Path, PurePosixPath

from pydicom.dataset import Dataset

from dicom_node.spool.atomic import TMP_PREFIX, Chunks, atomic_write
from dicom_node.spool.base import FileTally, OrphanFile, Spool

PHOTOS = "photos"
RESULTS = "results"
PREFIX = "spool"  # what every relative path in a job record starts with
# A temporary file (an atomic write's) older than this is one a crash left; a younger one may be a
# write in progress on another node sharing the spool, and is left alone at start.
STALE_TMP_S = 3600.0


class LocalSpool(Spool):
    """Files under ``spool_dir`` (default ``<data_dir>/spool``); the paths handed to the job store
    start with ``spool/`` (relative to ``data_dir`` when the spool is there)."""

    def __init__(self, data_dir: str | os.PathLike[str], spool_dir: str | os.PathLike[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.root = Path(spool_dir) if spool_dir is not None else self.data_dir / PREFIX

    def prepare(self, stale_tmp_s: float = STALE_TMP_S) -> None:
        """Make the spool's directories; remove temporary files older than ``stale_tmp_s`` (a crash's:
        a younger one may be another node's write in progress)."""
        for sub in (PHOTOS, RESULTS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        older_than = time.time() - stale_tmp_s
        for tmp in self.root.rglob(f"{TMP_PREFIX}*"):
            try:
                if tmp.lstat().st_mtime < older_than:
                    tmp.unlink()
            except OSError:
                pass

    def path(self, relative: str) -> Path:
        parts = PurePosixPath(relative).parts
        if parts and parts[0] == PREFIX:
            return self.root.joinpath(*parts[1:])
        return self.data_dir / relative

    def _relative(self, path: Path) -> str:
        """What a job record names ``path`` (below the root) by."""
        return str(PurePosixPath(PREFIX, *path.relative_to(self.root).parts))

    def write_photo(self, part10: bytes | Chunks) -> str:
        name = f"{secrets.token_hex(16)}.dcm"
        target = self.root / PHOTOS / name[:2] / name
        atomic_write(target, part10)
        return self._relative(target)

    def write_result(self, job_id: int, kind: str, dataset: Dataset, attempt: int | None = None) -> str:
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        name = f"{kind}.dcm" if attempt is None else f"{kind}-{int(attempt)}.dcm"
        target = self.root / RESULTS / str(int(job_id)) / name
        atomic_write(target, buffer.getbuffer())
        return self._relative(target)

    def discard(self, relative: str) -> None:
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ retention

    def _inside(self, relative: str) -> Path | None:
        """The path of ``relative`` if it lies in this spool (a record never sends a deletion elsewhere)."""
        path = self.path(relative)
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return path

    def _results_dir(self, job_id: int) -> Path:
        return self.root / RESULTS / str(int(job_id))

    def delete_job_files(self, job_id: int, photo_path: str, result_paths: Sequence[str]) -> FileTally:
        files = size = 0
        targets = [self._inside(p) for p in (photo_path, *result_paths)]
        results_dir = self._results_dir(job_id)
        if results_dir.is_dir():  # also what was written but never recorded (an encoding cut short)
            targets += sorted(p for p in results_dir.iterdir() if not p.is_dir())
        for target in dict.fromkeys(t for t in targets if t is not None):
            freed = _unlink(target)
            if freed is not None:
                files += 1
                size += freed
        _rmdir(results_dir)
        return FileTally(files, size)

    def job_files(self, job_id: int, photo_path: str) -> FileTally:
        paths = [self._inside(photo_path)]
        results_dir = self._results_dir(job_id)
        if results_dir.is_dir():
            paths += [p for p in results_dir.iterdir() if not p.is_dir()]
        sizes = [_size(p) for p in paths if p is not None and p.exists()]
        return FileTally(len(sizes), sum(sizes))

    def usage_bytes(self) -> int:
        return sum(_size(Path(entry.path)) for entry in _files(self.root))

    def sweep_orphans(self, photos_in_use: Collection[str], jobs_in_use: Collection[int],
                      older_than: float) -> list[OrphanFile]:
        deleted: list[OrphanFile] = []

        def sweep(entry: os.DirEntry[str], job_id: int | None, in_use: bool) -> None:
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                    return  # being written now, or just committed
            except FileNotFoundError:
                return
            if in_use and not entry.name.startswith(TMP_PREFIX):
                return
            freed = _unlink(Path(entry.path))
            if freed is not None:
                deleted.append(OrphanFile(self._relative(Path(entry.path)), freed, job_id))

        photos = self.root / PHOTOS
        for entry in _files(photos):
            sweep(entry, None, self._relative(Path(entry.path)) in photos_in_use)
        results = self.root / RESULTS
        for top in _scandir(results):
            job_id = int(top.name) if top.name.isdigit() else None
            if not top.is_dir(follow_symlinks=False):
                sweep(top, None, False)
                continue
            in_use = job_id is not None and job_id in jobs_in_use
            try:  # a directory made (or written to) within the grace may be about to receive a file
                fresh = top.stat(follow_symlinks=False).st_mtime >= older_than
            except FileNotFoundError:
                continue
            for entry in _files(Path(top.path)):
                sweep(entry, job_id, in_use)
            if not in_use and not fresh:
                _rmdir(Path(top.path))
        # a stray temporary file anywhere else in the spool (an interrupted write of a later layout)
        for top in _scandir(self.root):
            if top.name not in (PHOTOS, RESULTS):
                for entry in [top] if not top.is_dir(follow_symlinks=False) else list(_files(Path(top.path))):
                    if entry.name.startswith(TMP_PREFIX):
                        sweep(entry, None, False)
        return deleted


def _scandir(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _files(directory: Path) -> Iterator[os.DirEntry[str]]:
    """Every file below ``directory`` (links are not followed)."""
    for entry in _scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            yield from _files(Path(entry.path))
        else:
            yield entry


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: Path) -> int | None:
    """Delete one file; its size, or None when it was already gone."""
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return None
    return size


def _rmdir(directory: Path) -> None:
    """Remove a job's results directory once empty (photo shard directories stay: intake writes into them)."""
    try:
        directory.rmdir()
    except (FileNotFoundError, OSError):
        pass
