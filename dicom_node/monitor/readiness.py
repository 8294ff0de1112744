"""``/readyz``: named checks that must all pass before the node should be sent photos.

A check is a function returning a :class:`CheckResult`; a check that raises counts as failed with
the exception as its detail, so one broken dependency never hides the state of the others.
The node (:mod:`dicom_node.node`) puts its four together: model loaded, job store writable, intake
above the disk watermark, DICOM listener up; the web side only evaluates them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.monitor.health import Health
from dicom_node.queue.store import JobStore

if TYPE_CHECKING:
    from dicom_node.intake.watermark import DiskWatermark

MB = 1_000_000


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


Check = Callable[[], CheckResult]


class Readiness:
    """A set of named checks, run on demand."""

    def __init__(self, checks: Mapping[str, Check]) -> None:
        self.checks = dict(checks)

    def evaluate(self) -> tuple[bool, dict[str, CheckResult]]:
        results: dict[str, CheckResult] = {}
        for name, check in self.checks.items():
            try:
                results[name] = check()
            except Exception as exc:
                results[name] = CheckResult(False, f"check failed: {type(exc).__name__}: {exc}")
        return all(r.ok for r in results.values()), results


# --------------------------------------------------------------------------- checks


def health_model_check(health: Health) -> Check:
    """The node's workers have loaded the model and are not dying (see :mod:`dicom_node.monitor.health`)."""

    def check() -> CheckResult:
        problems = health.problems
        if problems:
            return CheckResult(False, "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())))
        return CheckResult(True, "model loaded by the workers")

    return check


def job_store_check(store: JobStore, data_dir: Path) -> Check:
    """The job store answers and the data directory it lives in takes a new file."""

    def check() -> CheckResult:
        store.counts()
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".readyz-", delete=True) as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
        return CheckResult(True, f"job store readable, {data_dir} writable")

    return check


def disk_watermark_check(watermark: DiskWatermark) -> Check:
    """Intake takes photos: the data directory is above the disk watermark (or back above its
    resume level). The same object answers C-STOREs with 0xA700, so ``/readyz`` and intake never
    disagree about whether there is room."""

    def check() -> CheckResult:
        state = watermark.state()
        return CheckResult(not state.refusing, state.describe())

    return check


def disk_space_check(path: Path, min_free_bytes: int) -> Check:
    """At least ``min_free_bytes`` free in ``path``, for a server without intake (the node itself
    uses :func:`disk_watermark_check`)."""

    def check() -> CheckResult:
        free = shutil.disk_usage(path).free
        detail = f"{free / MB:.0f} MB free in {path} (minimum {min_free_bytes / MB:.0f} MB)"
        return CheckResult(free >= min_free_bytes, detail)

    return check


def listener_check(listening: Callable[[], bool], where: str) -> Check:
    """The DICOM port takes associations."""

    def check() -> CheckResult:
        up = listening()
        return CheckResult(up, f"DICOM port {where} {'listening' if up else 'not listening'}")

    return check
