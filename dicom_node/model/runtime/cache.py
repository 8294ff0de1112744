"""Where exported graphs and agreement results live: beside the model, keyed by what they depend on.

An exported graph is only valid for the checkpoint it was exported from and the input shape it
was traced at (shapes are baked into the trace), so its file name carries both plus the runtime.
An agreement result also depends on the package versions and the CPU it was measured on.
Several worker processes start at once; a file lock makes the first one do the work and the
others read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dicom_node.model.runtime.cpu import isa_signature

CACHE_DIR_NAME = "runtime-cache"


def cache_dir_for(model_dir: Path, digest: str) -> Path:
    """``<model_dir>/runtime-cache`` when it can be written, else one under the user's cache."""
    beside = Path(model_dir) / CACHE_DIR_NAME
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
        return beside
    except OSError:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        fallback = base / "dicom_node" / CACHE_DIR_NAME / digest[:16]
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def graph_stem(runtime: str, digest: str, padded_hw: tuple[int, int]) -> str:
    return f"{runtime}-{digest[:16]}-{padded_hw[0]}x{padded_hw[1]}"


@contextlib.contextmanager
def locked(cache_dir: Path, name: str) -> Iterator[None]:
    """An exclusive lock across processes (released by the kernel if the holder dies)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".lock-{name}", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def machine_signature() -> str:
    """The CPU model, its instruction-set flags and any cap on them (:func:`isa_signature`): a speed
    measured elsewhere says nothing here."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caps = isa_signature()
    digest = hashlib.sha256(f"{model}|{flags}|{os.cpu_count()}".encode()).hexdigest()[:16]
    return f"{model or platform.machine()} [{digest}]" + (f" {caps}" if caps else "")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
