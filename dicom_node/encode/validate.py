"""Run dicom3tools' ``dciodvfy``, the reference IOD validator, on an object we built.

dciodvfy prints its findings to stderr and its exit status is not reliable (SR content errors
exit 0), so the lines are what count: a line starting with ``Error`` is a failure, one
starting with ``Warning`` is reported but tolerated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

DCIODVFY = "dciodvfy"


@dataclass(frozen=True)
class ValidationReport:
    """dciodvfy's findings for one object."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


def dciodvfy_available() -> bool:
    return shutil.which(DCIODVFY) is not None


def validate(path_or_dataset: str | os.PathLike | Dataset, timeout_s: float = 60.0) -> ValidationReport:
    """Run dciodvfy on a file, or on a dataset written to a temporary file first."""
    if shutil.which(DCIODVFY) is None:
        raise FileNotFoundError(f"{DCIODVFY} not found (Debian package dicom3tools)")
    if isinstance(path_or_dataset, Dataset):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "object.dcm"
            path_or_dataset.save_as(path, enforce_file_format=True)
            return _run(path, timeout_s)
    return _run(Path(path_or_dataset), timeout_s)


def _run(path: Path, timeout_s: float) -> ValidationReport:
    completed = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, errors="replace", timeout=timeout_s
    )
    output = completed.stderr + completed.stdout
    lines = [line.strip() for line in output.splitlines()]
    return ValidationReport(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


def run_dciodvfy(path_or_dataset: str | os.PathLike | Dataset) -> list[str]:
    """dciodvfy's Error lines for a file or dataset (empty: the object is valid)."""
    return validate(path_or_dataset).errors
