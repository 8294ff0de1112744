"""``/readyz``: named checks that must all pass before the node should be sent photos.

A check is a function returning a :class:`CheckResult`; a check that raises counts as failed with
the exception as its detail, so one broken dependency never hides the state of the others.
:func:`node_readiness` builds the node's four: model loaded, job store writable, free disk space,
DICOM listener up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.queue.store import JobStore

if TYPE_CHECKING:
    from dicom_node.health import Health
    from dicom_node.node import Node
    from dicom_node.web.parsing import ParserProvider
    from dicom_node.web.settings import HttpSettings

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
    """The node's workers have loaded the model and are not dying (see :mod:`dicom_node.health`)."""

    def check() -> CheckResult:
        problems = health.problems
        if problems:
            return CheckResult(False, "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())))
        return CheckResult(True, "model loaded by the workers")

    return check


def parser_model_check(provider: ParserProvider) -> Check:
    """The API's own parser has its model (loaded now if it was not yet)."""

    def check() -> CheckResult:
        parser = provider.get()
        untrained = " (UNTRAINED test model)" if parser.untrained else ""
        return CheckResult(True, f"model {parser.model_digest[:16]} loaded{untrained}")

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


def disk_space_check(path: Path, min_free_bytes: int) -> Check:
    def check() -> CheckResult:
        free = shutil.disk_usage(path).free
        detail = f"{free / MB:.0f} MB free in {path} (minimum {min_free_bytes / MB:.0f} MB)"
        return CheckResult(free >= min_free_bytes, detail)

    return check


def node_readiness(node: Node, settings: HttpSettings) -> Readiness:
    """The node's readiness: its workers' model, its job store, free disk space, its DICOM port."""
    config = node.config
    checks: dict[str, Check] = {}
    if node.health is not None:
        checks["model"] = health_model_check(node.health)
    if node.store is not None:
        checks["job_store"] = job_store_check(node.store, config.data_dir)
    checks["disk_space"] = disk_space_check(config.data_dir, settings.min_free_disk_mb * MB)

    def dicom_listener() -> CheckResult:
        intake = node.intake
        if intake is None:
            return CheckResult(False, "DICOM intake not started")
        # IntakeSCP keeps its server while it listens; `listening` is the public spelling once it has one
        listening = getattr(intake, "listening", None)
        up = bool(listening) if listening is not None else getattr(intake, "_server", None) is not None
        where = f"{config.bind_address}:{intake.port}"
        return CheckResult(up, f"DICOM port {where} {'listening' if up else 'not listening'}")

    checks["dicom_listener"] = dicom_listener
    return Readiness(checks)
