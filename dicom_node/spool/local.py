"""The spool as a directory on this node's disk (``<data_dir>/spool``): the embedded default."""

from __future__ import annotations

import os
import secrets
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.spool.atomic import TMP_PREFIX, Chunks, atomic_write
from dicom_node.spool.base import Spool

PHOTOS = "photos"
RESULTS = "results"


class LocalSpool(Spool):
    """Files under ``<data_dir>/spool``; paths handed to the job store are relative to ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "spool"

    def prepare(self) -> None:
        for sub in (PHOTOS, RESULTS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for tmp in self.root.rglob(f"{TMP_PREFIX}*"):
            try:
                tmp.unlink()
            except OSError:
                pass

    def path(self, relative: str) -> Path:
        return self.data_dir / relative

    def write_photo(self, part10: bytes | Chunks) -> str:
        name = f"{secrets.token_hex(16)}.dcm"
        target = self.root / PHOTOS / name[:2] / name
        atomic_write(target, part10)
        return str(target.relative_to(self.data_dir))

    def write_result(self, job_id: int, kind: str, dataset: Dataset) -> str:
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        target = self.root / RESULTS / str(job_id) / f"{kind}.dcm"
        atomic_write(target, buffer.getbuffer())
        return str(target.relative_to(self.data_dir))

    def discard(self, relative: str) -> None:
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            pass
