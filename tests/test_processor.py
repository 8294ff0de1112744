"""The processing stage on one job: decode -> parse -> encode -> spooled results, and what happens when
a photo or the machine is the problem. Runs in-process with the tiny untrained model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.config import NodeConfig
from dicom_node.parse.engine import HumanParser
from dicom_node.pipeline.processor import PhotoProcessor
from dicom_node.pipeline.routing import Router
from dicom_node.queue.job import JobState, NewJob
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.photo_factory import make_16bit_photo, make_vl_photo, synthetic_rgb, truncate_pixel_data

OWNER = "n/worker-0-1/"
SEG, SC, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def parser(small_model_dir: Path) -> HumanParser:
    return HumanParser.from_model_dir(small_model_dir, threads=2)


@pytest.fixture
def setup(tmp_path: Path, parser: HumanParser):
    config = NodeConfig(
        node_id="n",
        data_dir=tmp_path / "data",
        callers=[{"ae_title": "MOD", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        routing={"rules": [{"name": "photos", "match": {"Modality": ["XC"]}}]},
    )
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    router = Router(config.routing.rules, config.peers)
    yield config, store, spool, PhotoProcessor(store, spool, parser, OWNER, router, config.intake.decode_limits(),
                                               config.results.encode_options(), config.worker.max_attempts)
    store.close()


def receive(store: SqliteJobStore, spool: LocalSpool, ds) -> int:
    """What intake does: spool the Part 10 bytes, commit the job; then a worker claims it."""
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = spool.write_photo(buffer.getvalue())
    job, _ = store.add_received(NewJob(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, "MOD",
                                       "127.0.0.1", path))
    assert store.claim_for_processing(OWNER).id == job.id
    return job.id


def test_a_good_photo_ends_dispatching_with_three_spooled_results(setup) -> None:
    config, store, spool, processor = setup
    photo = make_vl_photo(synthetic_rgb(96, 128))
    job = processor.run(store.get(receive(store, spool, photo)))
    assert job.state == JobState.DISPATCHING and job.owner is None
    assert job.destinations == ("pacs",) and job.rule == "photos" and job.parse_s > 0
    assert [r.kind for r in job.results] == ["seg", "sc", "sr"]
    for result, sop_class in zip(job.results, (SEG, SC, SR), strict=True):
        ds = pydicom.dcmread(spool.path(result.path))
        assert ds.SOPClassUID == sop_class and ds.SOPInstanceUID == result.sop_instance_uid
        assert ds.StudyInstanceUID == photo.StudyInstanceUID


def test_a_photo_that_cannot_be_decoded_fails_at_once_with_its_reason(setup) -> None:
    config, store, spool, processor = setup
    corrupt = truncate_pixel_data(make_vl_photo(synthetic_rgb(64, 96)), 3000)
    job = processor.run(store.get(receive(store, spool, corrupt)))
    assert job.state == JobState.FAILED and job.attempts == 1
    assert job.reason.startswith("cannot decode the photo: pixel data truncated")
    deep = make_16bit_photo(np.zeros((32, 48), np.uint16))
    job = processor.run(store.get(receive(store, spool, deep)))
    assert job.state == JobState.FAILED and "16-bit samples" in job.reason
    assert list((spool.root / "results").rglob("*.dcm")) == []


def test_a_photo_no_rule_takes_is_done_with_a_note(setup) -> None:
    config, store, spool, processor = setup
    job = processor.run(store.get(receive(store, spool, make_vl_photo(synthetic_rgb(32, 48), Modality="OT"))))
    assert job.state == JobState.DONE and job.reason == "not processed: no routing rule matches this photo"
    assert job.results == ()


def test_an_error_while_encoding_fails_that_job_only(setup) -> None:
    config, store, spool, processor = setup
    broken = make_vl_photo(synthetic_rgb(64, 96), SeriesInstanceUID=None)  # decodes, cannot be referenced
    failed = processor.run(store.get(receive(store, spool, broken)))
    assert failed.state == JobState.FAILED and failed.reason.startswith("building SEG/SC/SR failed")
    assert "SeriesInstanceUID" in failed.reason
    good = processor.run(store.get(receive(store, spool, make_vl_photo(synthetic_rgb(64, 96)))))
    assert good.state == JobState.DISPATCHING, "the next photo is processed as usual"


def test_a_disk_problem_requeues_the_job_with_a_delay(setup) -> None:
    config, store, spool, processor = setup
    job_id = receive(store, spool, make_vl_photo(synthetic_rgb(64, 96)))
    (spool.root / "results").rmdir()
    (spool.root / "results").write_text("the disk is not writable here")
    job = processor.run(store.get(job_id))
    assert job.state == JobState.RECEIVED and "will try again" in job.reason
    assert job.not_before > time.time() + 10


def test_a_missing_spool_file_fails_the_job(setup) -> None:
    config, store, spool, processor = setup
    job_id = receive(store, spool, make_vl_photo(synthetic_rgb(32, 48)))
    spool.path(store.get(job_id).photo_path).unlink()
    job = processor.run(store.get(job_id))
    assert job.state == JobState.FAILED and "is missing" in job.reason
