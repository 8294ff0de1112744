"""Shared pieces of the web tests: photos as upload bytes, the app over the tiny model, a live server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.filebase import DicomBytesIO

from dicom_node.config import HttpSettings
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.monitor.readiness import Readiness, disk_space_check, job_store_check
from dicom_node.queue.job import JobState, NewJob
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.web.app import create_app
from dicom_node.web.parsing import ParserProvider, parser_model_check
from dicom_node.web.server import HttpServer
from tests.photo_factory import make_vl_photo, synthetic_rgb

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
PHOTO_HW = (120, 160)


def photo_rgb() -> np.ndarray:
    return synthetic_rgb(*PHOTO_HW)


def png_bytes(rgb: np.ndarray | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_rgb() if rgb is None else rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_rgb() if rgb is None else rgb).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def dicom_bytes(rgb: np.ndarray | None = None, preamble: bool = True) -> bytes:
    ds = make_vl_photo(photo_rgb() if rgb is None else rgb)
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def new_job(uid: str, calling_ae: str = "TESTSCU") -> NewJob:
    return NewJob(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                  transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae=calling_ae, calling_host="127.0.0.1",
                  photo_path=f"spool/{uid}.dcm")


def fill_job_store(store: SqliteJobStore) -> dict[str, int]:
    """Three jobs moved by the store's own calls: one done, one failed, one still received. Returns their ids."""
    done, _ = store.add_received(new_job("1.2.3.1"))
    claimed = store.claim_for_processing("test/worker-0/")
    assert claimed is not None and claimed.id == done.id
    store.advance(done.id, "test/worker-0/", JobState.DONE, "no routing rule processes this photo")
    failed, _ = store.add_received(new_job("1.2.3.2", calling_ae="MODALITY"))
    store.fail(failed.id, "pixel data truncated: 10 bytes present, 57600 expected")
    received, _ = store.add_received(new_job("1.2.3.3"))
    return {"done": done.id, "failed": failed.id, "received": received.id}


@pytest.fixture(scope="session")
def web_parser(small_model_dir: Path) -> ParserProvider:
    """The API's parser over the tiny untrained model, loaded once (one torch thread: a shared machine)."""
    provider = ParserProvider.from_model_dir(small_model_dir, threads=1, max_waiting=4)
    provider.get()
    return provider


def make_app(parser: ParserProvider, data_dir: Path, store: SqliteJobStore | None = None,
             settings: HttpSettings | None = None, metrics: NodeMetrics | None = None):
    checks = {"model": parser_model_check(parser), "disk_space": disk_space_check(data_dir, 1)}
    if store is not None:
        checks["job_store"] = job_store_check(store, data_dir)
    return create_app(parser, store, Readiness(checks), metrics or NodeMetrics(job_store=store),
                      settings or HttpSettings())


@pytest.fixture
def job_store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3")
    try:
        yield store
    finally:
        store.close()


class LiveServer:
    """The app on a real uvicorn server on a free loopback port."""

    def __init__(self, app) -> None:
        self.server = HttpServer(app, "127.0.0.1", 0)

    def __enter__(self) -> HttpServer:
        self.server.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
