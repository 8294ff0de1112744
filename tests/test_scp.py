"""Intake: who may associate, what is negotiated, and that an acknowledgement means spooled + committed.

The SCP runs in-process (a real pynetdicom server on a free port with a real SQLite store and
spool); the peers are dcmtk's echoscu/storescu and the node's own SCU (which reports the exact
status).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import NodeConfig
from dicom_node.dispatch.scu import AssociationError, Peer, store_files
from dicom_node.intake.scp import IntakeSCP
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.net import status
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.job import JobState
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import NODE_AET, SCU_AET, free_port, need_tools, storescu, write_photos
from tests.photo_factory import make_jpeg_photo_with_img2dcm, make_vl_photo, synthetic_rgb, write_dataset


@pytest.fixture
def intake(tmp_path: Path):
    config = NodeConfig(
        port=free_port(),
        data_dir=tmp_path / "data",
        callers=[{"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "pacs"},
                 {"ae_title": "PINNED", "host": "10.1.2.3", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    scp = IntakeSCP(config.listener, config.intake, config.peers, store, spool, NullMetrics(),
                    new_doorbells().photo_received)
    scp.start()
    yield scp
    scp.stop()
    store.close()


def peer(scp: IntakeSCP) -> Peer:
    return Peer(NODE_AET, "127.0.0.1", scp.port)


def echoscu(port: int, calling: str = SCU_AET, called: str = NODE_AET) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def test_echo_and_association_checks(intake: IntakeSCP) -> None:
    need_tools("echoscu")
    assert echoscu(intake.port).returncode == 0
    stranger = echoscu(intake.port, calling="STRANGER")
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
    pinned = echoscu(intake.port, calling="PINNED")  # allowed only from 10.1.2.3
    assert pinned.returncode != 0 and "Association Rejected" in pinned.stderr
    wrong_called = echoscu(intake.port, called="SOMEONE_ELSE")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr


def test_store_spools_the_object_as_sent_and_commits_its_job(intake: IntakeSCP, tmp_path: Path) -> None:
    photo = make_vl_photo(synthetic_rgb(48, 64))
    path = write_dataset(photo, tmp_path / "photo.dcm")
    (outcome,) = store_files(peer(intake), [path], SCU_AET)
    assert outcome.status == status.SUCCESS
    job = intake.store.find(photo.SOPInstanceUID)
    assert job.state == JobState.RECEIVED and job.calling_ae == SCU_AET and job.calling_host == "127.0.0.1"
    assert job.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    spooled = pydicom.dcmread(intake.spool.path(job.photo_path))
    assert spooled.SOPInstanceUID == photo.SOPInstanceUID and spooled.PixelData == photo.PixelData
    assert photo.SOPInstanceUID not in job.photo_path, "peer UIDs never become file names"


def test_jpeg_photos_are_received_as_jpeg(intake: IntakeSCP, tmp_path: Path) -> None:
    need_tools("storescu", "img2dcm")
    path = make_jpeg_photo_with_img2dcm(synthetic_rgb(64, 96), tmp_path)
    sent = storescu([path], intake.port, jpeg=True)
    assert sent.returncode == 0, sent.stderr
    (job,) = intake.store.list_jobs()
    assert job.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
    assert intake.spool.path(job.photo_path).read_bytes()[128:132] == b"DICM"


def test_a_sop_class_we_do_not_accept_is_not_negotiated(intake: IntakeSCP, tmp_path: Path) -> None:
    need_tools("storescu")
    ds = make_vl_photo(synthetic_rgb(32, 48))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    path = write_dataset(ds, tmp_path / "ct.dcm")
    sent = storescu([path], intake.port)
    assert sent.returncode != 0 and "presentation context" in sent.stderr.lower()
    with pytest.raises(AssociationError, match="none of the proposed presentation contexts"):
        store_files(peer(intake), [path], SCU_AET)
    assert intake.store.list_jobs() == []


def test_the_same_instance_twice_is_one_job_and_one_file(intake: IntakeSCP, tmp_path: Path) -> None:
    path = write_photos([make_vl_photo(synthetic_rgb(32, 48))], tmp_path)[0]
    outcomes = store_files(peer(intake), [path, path], SCU_AET) + store_files(peer(intake), [path], SCU_AET)
    assert [o.status for o in outcomes] == [status.SUCCESS] * 3
    assert len(intake.store.list_jobs()) == 1
    assert len(list((intake.spool.root / "photos").rglob("*.dcm"))) == 1


def test_a_spool_that_cannot_be_written_answers_out_of_resources(intake: IntakeSCP, tmp_path: Path) -> None:
    photos_dir = intake.spool.root / "photos"
    shutil.rmtree(photos_dir)
    photos_dir.write_text("not a directory")  # even root cannot write below a file
    path = write_photos([make_vl_photo(synthetic_rgb(32, 48))], tmp_path)[0]
    (outcome,) = store_files(peer(intake), [path], SCU_AET)
    assert outcome.status == status.OUT_OF_RESOURCES
    assert intake.store.list_jobs() == [], "nothing acknowledged, nothing recorded"

    photos_dir.unlink()  # the administrator frees the disk; the sender retries
    (outcome,) = store_files(peer(intake), [path], SCU_AET)
    assert outcome.status == status.SUCCESS and len(intake.store.list_jobs()) == 1


def test_a_job_store_that_cannot_commit_answers_out_of_resources(intake: IntakeSCP, tmp_path: Path) -> None:
    intake.store.close()
    path = write_photos([make_vl_photo(synthetic_rgb(32, 48))], tmp_path)[0]
    (outcome,) = store_files(peer(intake), [path], SCU_AET)
    assert outcome.status == status.OUT_OF_RESOURCES
    assert list((intake.spool.root / "photos").rglob("*.dcm")) == [], "no orphan file is left"
