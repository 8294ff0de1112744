"""Durable, atomic file writes: what the spool, the health file and every other stage rely on.

Atomic means: write a temporary file in the same directory, flush, fsync, rename over the final
name, fsync the directory. After a crash a path either holds the whole object or does not exist;
a half-written photo can never become a job, nor a half-written result be sent.

Large objects are written with O_DIRECT where the file system allows it. Buffered, each new file
first takes fresh page-cache pages, and under a hypervisor that first touch costs more than the
disk write: measured here, 1 MB to a new file took 4.6 ms buffered + 1.3 ms fsync, and 0.7 ms +
0.4 ms direct. A received photo is not read back by intake, so the cache would not pay off.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

TMP_PREFIX = ".tmp-"
_DIRECT_ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the logical block size
_DIRECT_MIN_BYTES = 64 * 1024  # below this a buffered write is as fast
_O_DIRECT = getattr(os, "O_DIRECT", 0)

Chunks = Sequence[bytes | bytearray | memoryview]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """mkdir -p, fsyncing the parent of each directory it creates: the new file's own directory
    fsync does not make that directory's entry durable."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return
    _fsync_dir(directory.parent)


class _AlignedBuffer(threading.local):
    """One page-aligned staging buffer per thread, grown as needed and kept (no re-faulting)."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None

    def fill(self, chunks: Chunks, size: int) -> memoryview:
        padded = -(-size // _DIRECT_ALIGN) * _DIRECT_ALIGN
        if self.buffer is None or len(self.buffer) < padded:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = mmap.mmap(-1, max(padded, 4 * 1024 * 1024))
        view = memoryview(self.buffer)
        offset = 0
        for chunk in chunks:
            n = len(chunk)
            view[offset:offset + n] = chunk
            offset += n
        view[offset:padded] = bytes(padded - offset)
        return view[:padded]


_staging = _AlignedBuffer()
_direct_unsupported: set[int] = set()  # st_dev of file systems that refused O_DIRECT


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _write_direct(tmp: Path, chunks: Chunks, size: int) -> bool:
    """Write through O_DIRECT; False (nothing left behind) where the file system refuses it."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o640)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    try:
        try:
            _write_all(fd, _staging.fill(chunks, size))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            os.close(fd)
            fd = -1
            tmp.unlink()
            return False
        os.ftruncate(fd, size)  # drop the block padding
        os.fsync(fd)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def _write_buffered(tmp: Path, chunks: Chunks) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            _write_all(fd, memoryview(chunk).cast("B"))
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | bytearray | memoryview | Chunks) -> None:
    """Write ``data`` (bytes, or a sequence of byte chunks written back to back) to ``path`` so
    that the path holds all of it or nothing, durably."""
    chunks: Chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    for chunk in chunks:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"atomic_write needs bytes, got {type(chunk).__name__}")
    size = sum(memoryview(c).nbytes for c in chunks)
    _make_dirs(path.parent)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    try:
        device = os.stat(path.parent).st_dev
        direct = (_O_DIRECT and size >= _DIRECT_MIN_BYTES and device not in _direct_unsupported
                  and _write_direct(tmp, chunks, size))
        if not direct:
            if _O_DIRECT and size >= _DIRECT_MIN_BYTES:
                _direct_unsupported.add(device)
            _write_buffered(tmp, chunks)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
