"""Dispatch: every result reaches the destination once, retries back off on a schedule kept in the job
store, and a job past the retry limit waits in failed until a person retries it. The PACS is dcmtk's
storescp, a real process."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit

from dicom_node.config import DispatchSettings, NodeConfig
from dicom_node.dispatch import Dispatcher, backoff_delay_s
from dicom_node.net.spool import Spool
from dicom_node.queue.job import JobState, NewJob, ResultObject
from dicom_node.queue.sqlite_store import SqliteJobStore
from tests.node_fixtures import StoreSCP, free_port, need_tools, wait_until
from tests.photo_factory import make_vl_photo, synthetic_rgb

OWNER = "n/dispatch-0/"


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = DispatchSettings(backoff_initial_s=5, backoff_factor=2, backoff_max_s=60)
    assert [backoff_delay_s(n, policy) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert backoff_delay_s(10_000, policy) == 60


def make_setup(tmp_path: Path, pacs_port: int, **dispatch: object):
    config = NodeConfig(
        node_id="n",
        data_dir=tmp_path / "data",
        callers=[{"ae_title": "MOD", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}],
        dispatch={"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10.0, "poll_interval_s": 0.05,
                  **dispatch},
    )
    store = SqliteJobStore(config.job_db_path)
    spool = Spool(config.data_dir)
    spool.prepare()
    return config, store, spool


def job_with_results(store: SqliteJobStore, spool: Spool, datasets: list) -> int:
    """A job as a worker leaves it: results spooled, DISPATCHING to 'pacs'."""
    job, _ = store.add_received(NewJob("1.2.3." + str(time.time_ns()), "1.2.840.10008.5.1.4.1.1.77.1.4",
                                       "1.2.840.10008.1.2.1", "MOD", "127.0.0.1", "spool/photos/x.dcm"))
    owner = "n/worker-0-1/"
    store.claim_for_processing(owner)
    store.set_route(job.id, owner, "rule", ["pacs"])
    store.advance(job.id, owner, JobState.ENCODING)
    results = []
    for kind, ds in zip(("seg", "sc", "sr"), datasets, strict=False):
        path = spool.write_result(job.id, kind, ds)
        results.append(ResultObject(kind, ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, path))
    store.finish_encoding(job.id, owner, results, parse_s=1.0)
    return job.id


def test_results_are_delivered_and_recorded(tmp_path: Path) -> None:
    need_tools("storescp")
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        config, store, spool = make_setup(tmp_path, pacs.port)
        datasets = [make_vl_photo(synthetic_rgb(32, 48)) for _ in range(3)]
        job_id = job_with_results(store, spool, datasets)
        dispatcher = Dispatcher(config, store, spool)
        done = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert done.state == JobState.DONE and len(done.deliveries) == 3
        received = {pydicom.dcmread(p).SOPInstanceUID for p in pacs.files()}
        assert received == {ds.SOPInstanceUID for ds in datasets}
        assert store.get(job_id).dispatch_attempts == 0
    finally:
        pacs.stop()


def test_outage_backs_off_then_delivers_when_the_pacs_returns(tmp_path: Path) -> None:
    need_tools("storescp")
    port = free_port()
    config, store, spool = make_setup(tmp_path, port, backoff_initial_s=0.5, backoff_max_s=0.5)
    job_id = job_with_results(store, spool, [make_vl_photo(synthetic_rgb(32, 48)) for _ in range(3)])
    dispatcher = Dispatcher(config, store, spool)

    before = time.time()
    waiting = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    assert waiting.state == JobState.DISPATCHING and waiting.dispatch_attempts == 1
    assert waiting.not_before == pytest.approx(before + 0.5, abs=0.5)
    assert "cannot connect" in waiting.reason and "next attempt in 0.5 s" in waiting.reason

    pacs = StoreSCP(tmp_path / "pacs", port=port).start()
    try:
        dispatcher.start()
        done = wait_until(lambda: (j := store.get(job_id)).state == JobState.DONE and j, 30, "delivery")
        dispatcher.stop()
        assert len(pacs.files()) == 3 and done.dispatch_attempts == 1
        assert [e.to_state for e in store.history(job_id)][-2:] == [JobState.DISPATCHING, JobState.DONE]
    finally:
        pacs.stop()


def test_past_the_limit_the_job_waits_for_a_person(tmp_path: Path) -> None:
    config, store, spool = make_setup(tmp_path, free_port(), max_attempts=2, backoff_initial_s=0.1)
    job_id = job_with_results(store, spool, [make_vl_photo(synthetic_rgb(32, 48))])
    dispatcher = Dispatcher(config, store, spool)
    dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    time.sleep(0.15)
    failed = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    assert failed.state == JobState.FAILED and failed.dispatch_attempts == 2
    assert f"dicom-node jobs retry {job_id}" in failed.reason
    assert store.claim_for_dispatch(OWNER, 60, now=time.time() + 3600) is None, "not retried forever"


def test_compressed_results_are_decompressed_for_a_pacs_that_only_takes_uncompressed(tmp_path: Path) -> None:
    need_tools("storescp", "dcmcjpeg")
    pacs = StoreSCP(tmp_path / "pacs", accept_compressed=False).start()
    try:
        config, store, spool = make_setup(tmp_path, pacs.port)
        jpeg = make_vl_photo(synthetic_rgb(64, 96), transfer_syntax=JPEGBaseline8Bit)
        job_with_results(store, spool, [jpeg])
        done = Dispatcher(config, store, spool).dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert done.state == JobState.DONE
        (received,) = [pydicom.dcmread(p) for p in pacs.files()]
        assert received.SOPInstanceUID == jpeg.SOPInstanceUID
        assert not received.file_meta.TransferSyntaxUID.is_compressed
    finally:
        pacs.stop()
