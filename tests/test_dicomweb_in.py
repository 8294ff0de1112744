"""DICOMweb in: STOW-RS (``POST /dicom-web/studies``) takes photos with C-STORE's checks and durability.

Two setups:

* the web app over a real :class:`~dicom_node.intake.accept.Acceptor` (real SQLite job store and
  spool, no workers), driven in-process: every refusal, per request and per instance, and that a
  refusal queues nothing;
* ``dicom-node serve`` as a subprocess with a worker, a dcmtk storescp as the PACS, its HTTP port on
  0.0.0.0 behind a bearer token: no token gets 401, a photo gets 200 and its SEG, SC and SR arrive as
  for a C-STORE; SIGKILL right after a 200 loses nothing.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.config import NodeConfig
from dicom_node.intake.accept import Acceptor
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.monitor.readiness import Readiness
from dicom_node.net import status
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.job import JobState
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from dicom_node.web.app import create_app
from dicom_node.web.dicomweb import DICOM_JSON_MEDIA_TYPE
from dicom_node.web.parsing import ParserProvider
from tests.node_fixtures import StoreSCP, free_port, need_tools, node_config, read, wait_until
from tests.photo_factory import make_vl_photo, synthetic_rgb, truncate_pixel_data, write_dataset
from tests.web_fixtures import LiveServer

DICOMWEB_AE = "DICOMWEB"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BOUNDARY = "dicom-node-stow-boundary-7f3a"
TOKEN = "stow-test-token-0123456789"
MAX_UPLOAD = 1024 * 1024
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
RESULT_MODALITIES = ["OT", "SEG", "SR"]

# DICOM JSON tags of the Store Instances Response Module (PS3.18 Annex I)
RETRIEVE_URL = "00081190"
FAILED = "00081198"
REFERENCED = "00081199"
OTHER_FAILURES = "0008119A"
FAILURE_REASON = "00081197"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
ERROR_COMMENT = "00000902"


# --------------------------------------------------------------------------- requests


def part10(ds: Dataset, tmp_path: Path) -> bytes:
    return write_dataset(ds, tmp_path / f"{generate_uid()}.dcm").read_bytes()


def part10_as_is(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file with its File Meta as it is, even where it disagrees with the data set."""
    ds.preamble = b"\x00" * 128
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def photo(**tags: object) -> Dataset:
    return make_vl_photo(synthetic_rgb(48, 64), **tags)


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: " + part_type.encode() + b"\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


def stow_headers(token: str | None = None, content_type: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
               "Accept": DICOM_JSON_MEDIA_TYPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return answer.get(tag, {}).get("Value", [])


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def failures(answer: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """SOP Instance UID -> (Failure Reason, Error Comment) of the Failed SOP Sequence."""
    return {value(i, SOP_INSTANCE): (value(i, FAILURE_REASON), value(i, ERROR_COMMENT)) for i in items(answer, FAILED)}


# --------------------------------------------------------------------------- the app over a real acceptor


@dataclass
class Stow:
    client: TestClient
    store: SqliteJobStore
    spool: LocalSpool
    metrics: NodeMetrics

    def post(self, body: bytes, path: str = "/dicom-web/studies", **headers: str) -> Any:
        return self.client.post(path, content=body, headers={**stow_headers(), **headers})

    def queued(self) -> tuple[int, int]:
        """(jobs, spooled photos): what a refusal must leave as it was."""
        photos = self.spool.root / "photos"
        return len(self.store.list_jobs()), len([p for p in photos.rglob("*") if p.is_file()]) if photos.exists() else 0


def stow_app(tmp_path: Path, model_dir: Path, callers: list[dict[str, Any]]) -> Iterator[Stow]:
    config = NodeConfig(
        data_dir=tmp_path / "data", port=free_port(), callers=callers,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        intake={"min_free_disk_mb": 1}, http={"max_upload_bytes": MAX_UPLOAD})
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    metrics = NodeMetrics(job_store=store, process_metrics=False)
    acceptor = Acceptor(config.intake, store, spool, metrics, new_doorbells().photo_received)
    parser = ParserProvider.from_model_dir(model_dir, threads=1, max_waiting=0)  # never loaded here
    app = create_app(parser, store, Readiness({}), metrics, config.http, acceptor=acceptor, peers=config.peers)
    try:
        with TestClient(app) as client:
            yield Stow(client, store, spool, metrics)
    finally:
        store.close()


@pytest.fixture
def stow(tmp_path: Path, small_model_dir: Path) -> Iterator[Stow]:
    # TestClient's peer is "testclient", no address: the DICOMweb caller is not pinned to a host here
    yield from stow_app(tmp_path, small_model_dir, [{"ae_title": DICOMWEB_AE, "return_to": "pacs"}])


def test_a_photo_is_spooled_and_committed_before_the_200(stow: Stow, tmp_path: Path) -> None:
    ds = photo()
    response = stow.post(multipart([part10(ds, tmp_path)]))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(DICOM_JSON_MEDIA_TYPE)
    answer = response.json()
    (stored,) = items(answer, REFERENCED)
    assert value(stored, SOP_INSTANCE) == ds.SOPInstanceUID and value(stored, SOP_CLASS) == ds.SOPClassUID
    assert FAILED not in answer and OTHER_FAILURES not in answer and RETRIEVE_URL in answer
    job = stow.store.find(ds.SOPInstanceUID)
    assert job is not None and job.state == JobState.RECEIVED
    assert job.calling_ae == DICOMWEB_AE and job.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    spooled = pydicom.dcmread(stow.spool.path(job.photo_path))
    assert spooled.SOPInstanceUID == ds.SOPInstanceUID and spooled.PixelData == ds.PixelData
    assert spooled.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    again = stow.post(multipart([part10(ds, tmp_path)]))  # a resend: acknowledged, one job, one file
    assert again.status_code == 200 and len(items(again.json(), REFERENCED)) == 1
    assert stow.queued() == (1, 1)


def test_refused_instances_get_their_dicom_status_and_nothing_is_queued(stow: Stow, tmp_path: Path) -> None:
    ct = photo(Modality="CT")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ct_in_photo_meta = photo()
    ct_in_photo_meta.SOPClassUID = CT_IMAGE  # the data set says CT, the File Meta says VL photo
    short = truncate_pixel_data(photo(), 1000)
    parts = [part10(ct, tmp_path), part10_as_is(ct_in_photo_meta), part10(short, tmp_path),
             b"\x89PNG\r\n\x1a\n not a DICOM file at all" * 20]

    response = stow.post(multipart(parts))
    assert response.status_code == 409, response.text
    answer = response.json()
    assert REFERENCED not in answer
    failed = failures(answer)
    assert failed[ct.SOPInstanceUID][0] == status.SOP_CLASS_NOT_SUPPORTED
    assert failed[ct_in_photo_meta.SOPInstanceUID][0] == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert failed[short.SOPInstanceUID] == (status.CANNOT_UNDERSTAND, "Pixel Data length does not match the image size")
    (other,) = items(answer, OTHER_FAILURES)  # a part that names no SOP instance
    assert value(other, FAILURE_REASON) == status.CANNOT_UNDERSTAND
    assert "Part 10" in value(other, ERROR_COMMENT)
    assert stow.queued() == (0, 0)
    rejected = {s.labels["reason"]: s.value for m in stow.metrics.registry.collect() for s in m.samples
                if s.name == "dicom_node_instances_rejected_total" and s.labels.get("source") == "dicomweb"}
    assert rejected["sop_class_not_accepted"] == 1 and rejected["not_a_dataset"] == 1, rejected

    good = photo()
    mixed = stow.post(multipart([part10(good, tmp_path), part10(ct, tmp_path)]))
    assert mixed.status_code == 202, mixed.text
    assert [value(i, SOP_INSTANCE) for i in items(mixed.json(), REFERENCED)] == [good.SOPInstanceUID]
    assert list(failures(mixed.json())) == [ct.SOPInstanceUID]
    assert stow.queued() == (1, 1)


def test_a_study_resource_takes_only_that_study(stow: Stow, tmp_path: Path) -> None:
    ds = photo()
    elsewhere = stow.post(multipart([part10(ds, tmp_path)]), path=f"/dicom-web/studies/{generate_uid()}")
    assert elsewhere.status_code == 409
    assert failures(elsewhere.json())[ds.SOPInstanceUID] == (
        status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID differs from the target study's")
    assert stow.queued() == (0, 0)
    there = stow.post(multipart([part10(ds, tmp_path)]), path=f"/dicom-web/studies/{ds.StudyInstanceUID}")
    assert there.status_code == 200 and stow.queued() == (1, 1)
    assert stow.post(multipart([part10(ds, tmp_path)]), path="/dicom-web/studies/1.2.03").status_code == 400


def test_requests_that_are_not_stow_rs_of_dicom_files_are_refused_whole(stow: Stow, tmp_path: Path) -> None:
    data = part10(photo(), tmp_path)

    def refused(response: Any, code: int) -> None:
        assert response.status_code == code, response.text
        assert response.json()["error"] and response.json()["message"]

    refused(stow.post(data, **{"Content-Type": "application/dicom"}), 415)
    refused(stow.post(multipart([data], "application/dicom+json"),
                      **{"Content-Type": f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'}),
            415)
    refused(stow.post(multipart([data]), **{"Content-Type": 'multipart/related; type="application/dicom"'}), 400)
    refused(stow.post(multipart([data])[:-40]), 400)  # no closing boundary: a cut-off body
    refused(stow.post(b"these bytes are no multipart body"), 400)
    refused(stow.post(multipart([data]), Accept="application/dicom+xml"), 406)
    too_big = multipart([data + b"\x00" * MAX_UPLOAD])
    refused(stow.post(too_big), 413)  # declared by Content-Length
    refused(stow.post(iter([too_big[:MAX_UPLOAD // 2], too_big[MAX_UPLOAD // 2:]])), 413)  # chunked: counted
    assert stow.queued() == (0, 0)


def test_dicomweb_clients_must_be_configured_callers(tmp_path: Path, small_model_dir: Path) -> None:
    pinned_elsewhere = [{"ae_title": DICOMWEB_AE, "host": "10.9.8.7", "return_to": "pacs"}]
    for app in stow_app(tmp_path, small_model_dir, pinned_elsewhere):
        response = app.post(multipart([part10(photo(), tmp_path)]))
        assert response.status_code == 403, response.text
        assert DICOMWEB_AE in response.json()["message"]
        assert app.queued() == (0, 0)


def test_orthanc_stores_a_photo_here_by_stow_rs(tmp_path: Path, small_model_dir: Path) -> None:
    """A real STOW-RS client: Orthanc's DICOMweb plugin sends a photo it holds to the node's route."""
    need_tools("Orthanc")
    callers = [{"ae_title": DICOMWEB_AE, "host": "127.0.0.1", "return_to": "pacs"}]
    for app in stow_app(tmp_path, small_model_dir, callers):
        with LiveServer(app.client.app) as server:
            orthanc = OrthancClient(tmp_path / "orthanc", f"{server.url}/dicom-web/").start()
            try:
                ds = photo()
                instance = orthanc.post("/instances", part10(ds, tmp_path), raw=True)["ID"]
                orthanc.post("/dicom-web/servers/node/stow", {"Resources": [instance], "Synchronous": True})
            finally:
                orthanc.stop()
        job = app.store.find(ds.SOPInstanceUID)
        assert job is not None and job.calling_ae == DICOMWEB_AE and job.calling_host == "127.0.0.1"
        assert app.queued() == (1, 1)


class OrthancClient:
    """Orthanc with only its DICOMweb plugin, which knows the node as the DICOMweb server "node"."""

    def __init__(self, workdir: Path, node_root: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "Name": "stow client", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"), "HttpPort": int(self.url.rsplit(":", 1)[1]),
            "DicomPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"node": [node_root]}},
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> OrthancClient:
        self.log = open(self.workdir / "orthanc.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=self.workdir)
        wait_until(lambda: self.get("/system"), 30, "Orthanc's REST API")
        return self

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any, raw: bool = False) -> Any:
        data = body if raw else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.log.close()
        self.process = None


# --------------------------------------------------------------------------- a real node


def http_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def result_modalities(pacs: StoreSCP, study_uid: str) -> list[str]:
    """Modalities of what storescp holds of one study (SC is "OT")."""
    return sorted(ds.Modality for ds in map(read, pacs.files()) if ds.StudyInstanceUID == study_uid)


def test_a_node_behind_a_token_returns_results_and_a_kill_after_the_200_loses_nothing(
        node_factory, small_model_dir: Path, tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    http_port = free_port()
    config = node_config(
        tmp_path / "data", small_model_dir, free_port(), pacs.port,
        callers=[{"ae_title": DICOMWEB_AE, "host": "127.0.0.1", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}],
        http={"port": http_port, "bind_address": "0.0.0.0", "token": TOKEN},  # off loopback: the token is required
        worker={"count": 1, "torch_threads": 1})
    node = node_factory(config)
    try:
        node.start()
        url = f"http://127.0.0.1:{http_port}/dicom-web/studies"
        first, second = photo(), photo()

        for token in (None, "not-the-token-at-all"):
            code, body = http_post(url, multipart([part10(first, tmp_path)]), stow_headers(token))
            assert code == 401, body
        ct = photo(Modality="CT")
        ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        code, answer = http_post(url, multipart([part10(ct, tmp_path)]), stow_headers(TOKEN))
        assert code == 409 and failures(answer)[ct.SOPInstanceUID][0] == status.SOP_CLASS_NOT_SUPPORTED
        assert node.jobs() == [], "refused: nothing queued"

        code, answer = http_post(url, multipart([part10(first, tmp_path)]), stow_headers(TOKEN))
        assert code == 200, answer
        assert [value(i, SOP_INSTANCE) for i in items(answer, REFERENCED)] == [first.SOPInstanceUID]
        wait_until(lambda: result_modalities(pacs, first.StudyInstanceUID) == RESULT_MODALITIES, 90,
                   f"SEG, SC and SR of the STOW-RS photo in storescp (node log: {node.log_path})")
        # the PACS holds the results a moment before the job's DONE is committed
        (job,) = node.wait_jobs_final(1, 30)
        assert job.state == JobState.DONE and job.calling_ae == DICOMWEB_AE and job.calling_host == "127.0.0.1"

        code, answer = http_post(url, multipart([part10(second, tmp_path)]), stow_headers(TOKEN))
        assert code == 200, answer
        node.kill9()  # right after the 200: the photo must be on disk and its job committed
        assert any(j.sop_instance_uid == second.SOPInstanceUID for j in node.jobs())
        node.start()
        jobs = node.wait_jobs_final(2, 90)
        assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.state, j.reason) for j in jobs]
        wait_until(lambda: result_modalities(pacs, second.StudyInstanceUID) == RESULT_MODALITIES, 30,
                   "SEG, SC and SR of the photo acknowledged before the SIGKILL")
    finally:
        node.stop()
        pacs.stop()
