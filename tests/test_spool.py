"""The spool's atomic writes: a path holds the whole object or nothing, on any file system."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.spool.atomic import atomic_write


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    atomic_write(target, b"x" * 1000)
    assert target.read_bytes() == b"x" * 1000
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "a" / "c.dcm", 12345)  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.dcm"]


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_atomic_write_of_large_chunks_direct_or_buffered(tmp_path: Path, where: str) -> None:
    """Large objects go through O_DIRECT where the file system allows it (ext4 here) and fall back
    to buffered writes where it refuses (tmpfs); either way the file holds exactly the chunks."""
    import os
    import tempfile

    if where == "tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm on this system")
        base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    else:
        base = tmp_path
    try:
        payload = os.urandom(1_000_003)  # not a multiple of the 4 KiB block
        chunks = [b"\x00" * 128, b"DICM", memoryview(payload)[:5], memoryview(payload)[5:]]
        target = base / "x" / "y" / "photo.dcm"
        atomic_write(target, chunks)
        assert target.read_bytes() == b"\x00" * 128 + b"DICM" + payload
        atomic_write(target, payload[:70_000])  # replaces, shorter than the previous file
        assert target.read_bytes() == payload[:70_000]
        assert sorted(p.name for p in target.parent.iterdir()) == ["photo.dcm"]
    finally:
        if where == "tmpfs":
            import shutil

            shutil.rmtree(base)
