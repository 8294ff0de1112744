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
from dicom_node.dispatch.dispatcher import Dispatcher, backoff_delay_s
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.job import JobState, NewJob, ResultObject
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
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
        dispatch={"give_up_after_h": 0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10.0,
                  "poll_interval_s": 0.05, **dispatch},
    )
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    return config, store, spool


def dispatcher_for(config: NodeConfig, store: SqliteJobStore, spool: LocalSpool) -> Dispatcher:
    return Dispatcher(config.dispatch, config.peers, config.ae_title, config.node_id, store, spool, NullMetrics(),
                      new_doorbells().results_ready)


def job_with_results(store: SqliteJobStore, spool: LocalSpool, datasets: list) -> int:
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
        dispatcher = dispatcher_for(config, store, spool)
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
    dispatcher = dispatcher_for(config, store, spool)

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
    dispatcher = dispatcher_for(config, store, spool)
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
        done = dispatcher_for(config, store, spool).dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert done.state == JobState.DONE
        (received,) = [pydicom.dcmread(p) for p in pacs.files()]
        assert received.SOPInstanceUID == jpeg.SOPInstanceUID
        assert not received.file_meta.TransferSyntaxUID.is_compressed
    finally:
        pacs.stop()


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    """Photos of about the given side lengths, written as Part 10 files (sizes differ, so the
    parallel path has something to balance)."""
    directory = tmp_path / "out"
    directory.mkdir(exist_ok=True)
    paths = []
    for i, side in enumerate(sizes):
        path = directory / f"{i}.dcm"
        make_vl_photo(synthetic_rgb(side, side)).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class _RecordingSCP:
    """A pynetdicom storage SCP that records arrival order and can refuse a second association
    (``maximum_associations``), like a PACS that allows one association per caller."""

    def __init__(self, maximum_associations: int, handler_delay_s: float = 0.0) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import VLPhotographicImageStorage

        self.received: list[str] = []
        self.peak = 0
        self._open = 0
        self._delay = handler_delay_s
        self.ae = AE(ae_title="RECORDER")
        self.ae.maximum_associations = maximum_associations
        self.ae.add_supported_context(VLPhotographicImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._opened), (evt.EVT_RELEASED, self._closed)])

    def _opened(self, event) -> None:
        self._open += 1
        self.peak = max(self.peak, self._open)

    def _closed(self, event) -> None:
        self._open -= 1

    def _store(self, event) -> int:
        time.sleep(self._delay)  # keeps an association busy, so the others overlap it
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_parallel_associations_deliver_everything_and_the_last_file_last(tmp_path: Path) -> None:
    from dicom_node.dispatch.scu import Peer, store_files

    scp = _RecordingSCP(maximum_associations=4, handler_delay_s=0.2)
    try:
        paths = _files(tmp_path, [300, 64, 200, 40, 16])
        seen: list[str] = []
        outcomes = store_files(Peer("RECORDER", "127.0.0.1", scp.port), paths, "NODE",
                               on_stored=lambda o: seen.append(o.sop_instance_uid), associations=2)
        uids = [_uid(p) for p in paths]
        assert [o.sop_instance_uid for o in outcomes] == uids and all(o.stored for o in outcomes)
        assert sorted(seen) == sorted(uids) and seen[-1] == uids[-1]
        assert sorted(scp.received) == sorted(uids) and scp.received[-1] == uids[-1]
        assert scp.peak == 2, "the objects went out on two associations at once"
    finally:
        scp.stop()


def test_a_refused_second_association_still_delivers_everything(tmp_path: Path) -> None:
    from dicom_node.dispatch.scu import Peer, store_files

    scp = _RecordingSCP(maximum_associations=1, handler_delay_s=0.2)
    try:
        paths = _files(tmp_path, [200, 100, 16])
        outcomes = store_files(Peer("RECORDER", "127.0.0.1", scp.port), paths, "NODE", associations=2)
        assert all(o.stored for o in outcomes), [o.describe() for o in outcomes]
        assert sorted(scp.received) == sorted(_uid(p) for p in paths)
        assert scp.received[-1] == _uid(paths[-1])
        assert scp.peak == 1, "the second association was refused, its file went on the first"
    finally:
        scp.stop()


def test_parallel_send_to_a_peer_that_is_down_raises(tmp_path: Path) -> None:
    from dicom_node.dispatch.scu import AssociationError, Peer, store_files

    with pytest.raises(AssociationError, match="cannot connect"):
        store_files(Peer("NOBODY", "127.0.0.1", free_port()), _files(tmp_path, [16, 16, 16]), "NODE",
                    associations=3)


def test_parallel_send_to_storescp_that_serves_one_association_at_a_time(tmp_path: Path) -> None:
    need_tools("storescp")
    pacs = StoreSCP(tmp_path / "pacs").start()  # no --fork: the second association waits its turn
    try:
        config, store, spool = make_setup(tmp_path, pacs.port)
        assert config.dispatch.associations_per_job == 2  # the default is what this exercises
        datasets = [make_vl_photo(synthetic_rgb(side, side)) for side in (200, 100, 16)]
        job_id = job_with_results(store, spool, datasets)
        done = dispatcher_for(config, store, spool).dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert done.state == JobState.DONE and len(done.deliveries) == 3
        assert {pydicom.dcmread(p).SOPInstanceUID for p in pacs.files()} == {d.SOPInstanceUID for d in datasets}
        assert store.get(job_id).dispatch_attempts == 0
    finally:
        pacs.stop()


def test_attempts_alone_do_not_give_up_before_the_time_horizon(tmp_path: Path) -> None:
    """max_attempts used up within minutes: the job keeps its schedule until give_up_after_h has passed."""
    config, store, spool = make_setup(tmp_path, free_port(), max_attempts=2, backoff_initial_s=0.1,
                                      give_up_after_h=24)
    job_id = job_with_results(store, spool, [make_vl_photo(synthetic_rgb(32, 48))])
    dispatcher = dispatcher_for(config, store, spool)
    for _ in range(3):
        job = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60, now=time.time() + 3600), OWNER)
        assert job.state == JobState.DISPATCHING and job.not_before is not None
    assert job.dispatch_attempts == 3 and "gives up after 2 attempts and 24 h" in job.reason
    assert store.get(job_id).dispatching_since is not None
