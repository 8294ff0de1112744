"""No job stays in PARSING or ENCODING because a write failed (issue 12).

A full disk breaks the job store's writes as well as the spool's: the worker's hand-back of the
job, and the supervisor's release of a dead worker's jobs, are then retried until they land. The
disk is really full here: a 30 MB tmpfs mounted by the test (the tests run as root, as CI does),
filled by a file that takes every free byte, and freed later from another thread.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.monitor.health import Health
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.node import worker_setup
from dicom_node.parse.engine import HumanParser
from dicom_node.parse.result import ParsingResult
from dicom_node.pipeline.processor import PhotoProcessor
from dicom_node.pipeline.routing import Router
from dicom_node.pipeline.supervisor import SWEEP_REASON, WorkerPool
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.job import PROCESSING_STATES, JobState, NewJob
from dicom_node.queue.owners import node_owners, worker_owner
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import wait_until
from tests.photo_factory import make_vl_photo, synthetic_rgb

NODE = "n"
OWNER = worker_owner(NODE, 0, 1)
FINAL_STATES = (JobState.DISPATCHING, JobState.DONE, JobState.FAILED)


# --------------------------------------------------------------------------- a small disk that fills up


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 30 MB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.fail("these tests fill a real disk: they mount a tmpfs and must run as root (CI does)")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {mount} (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # a straggling handle: detach it now


def fill(directory: Path) -> Path:
    """Take every free byte of the file system of ``directory`` with one file; return its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096):
            block = bytes(size)
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


class DiskFillingParser:
    """The real parser; its first ``parse()`` fills the disk and frees it ``free_after_s`` later."""

    def __init__(self, parser: HumanParser, disk: Path, free_after_s: float) -> None:
        self.parser, self.disk, self.free_after_s = parser, disk, free_after_s
        self.filled = threading.Event()
        self.freed = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.parser, name)

    def parse(self, rgb) -> ParsingResult:
        result = self.parser.parse(rgb)
        if not self.filled.is_set():
            filler = fill(self.disk)
            self.filled.set()

            def free() -> None:
                filler.unlink(missing_ok=True)  # a failing test may have unmounted the disk already
                self.freed.set()

            threading.Timer(self.free_after_s, free).start()
        return result


@pytest.fixture(scope="module")
def parser(small_model_dir: Path) -> HumanParser:
    return HumanParser.from_model_dir(small_model_dir, threads=2, runtime="eager")


def node_settings(data_dir: Path, **overrides: object) -> NodeConfig:
    return NodeConfig(
        node_id=NODE,
        data_dir=data_dir,
        callers=[{"ae_title": "MOD", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        routing={"rules": [{"name": "photos", "match": {"Modality": ["XC"]}}]},
        **overrides,
    )


def receive(store: SqliteJobStore, spool: LocalSpool | None = None) -> int:
    """What intake does: spool the photo (when a spool is given) and commit its job."""
    ds = make_vl_photo(synthetic_rgb(64, 96))
    path = "spool/photos/none.dcm"
    if spool is not None:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = spool.write_photo(buffer.getvalue())
    job, _ = store.add_received(NewJob(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, "MOD",
                                       "127.0.0.1", path))
    return job.id


def messages(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"event={event}" in r.getMessage()]


# --------------------------------------------------------------------------- attempts


def test_node_restarts_are_not_counted_but_worker_deaths_are(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    max_attempts = 3
    try:
        interrupted = receive(store)
        for restart in range(2 * max_attempts):  # claimed, then the whole node stops, again and again
            assert store.claim_for_processing(worker_owner(NODE, 0, 1)).id == interrupted
            store.release_owner(node_owners(NODE), "the node stopped", max_attempts, charge=False)
            job = store.get(interrupted)
            assert job.state == JobState.RECEIVED and job.attempts == 0, f"after restart {restart + 1}"
        store.advance(store.claim_for_processing(OWNER).id, OWNER, JobState.DONE)

        killer = receive(store)
        for death in range(1, max_attempts + 1):  # its worker dies while the node lives
            owner = worker_owner(NODE, 0, death)
            assert store.claim_for_processing(owner).id == killer
            (released,) = store.release_owner(owner, "worker 0 died (exit code -9)", max_attempts)
            expected = JobState.FAILED if death == max_attempts else JobState.RECEIVED
            assert released.state == expected and released.attempts == death
        assert f"gave up after {max_attempts} attempts" in store.get(killer).reason
    finally:
        store.close()


# --------------------------------------------------------------------------- the worker's hand-back


def test_a_disk_that_fills_up_mid_parse_leaves_no_job_stuck(small_disk: Path, parser: HumanParser,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The parse fills the disk: the next state write fails for real, the hand-back is retried until
    the space comes back (2 s later), and the job's next attempt ends DISPATCHING, without a restart."""
    caplog.set_level(logging.INFO)
    config = node_settings(small_disk / "data")
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    filling = DiskFillingParser(parser, small_disk, free_after_s=2.0)
    processor = PhotoProcessor(store, spool, filling, OWNER, Router(config.routing.rules, config.peers),
                               config.intake.decode_limits(), config.results.encode_options(),
                               config.worker.max_attempts, transient_retry_delay_s=0.2)
    try:
        job_id = receive(store, spool)
        deadline = time.monotonic() + 30
        while store.get(job_id).state not in FINAL_STATES:
            assert time.monotonic() < deadline, f"job stuck: {store.get(job_id)}"
            claimed = store.claim_for_processing(OWNER)
            if claimed is None:
                time.sleep(0.05)
                continue
            processor.run(claimed)  # the worker's loop: returns, never raises
            assert store.get(job_id).state not in PROCESSING_STATES, "run() returned with the job still held"
        job = store.get(job_id)
        assert filling.filled.is_set() and filling.freed.is_set()
        assert job.state == JobState.DISPATCHING and job.attempts == 2 and len(job.results) == 3
        (failed,) = messages(caplog, "worker.handback_failed")
        assert failed.levelno == logging.ERROR and "database or disk is full" in failed.getMessage()
        (landed,) = messages(caplog, "worker.handed_back")
        assert landed.levelno == logging.INFO and "state=received" in landed.getMessage()
        requeued = [e for e in store.history(job_id) if e.to_state == JobState.RECEIVED and e.reason]
        assert "disk is full" in requeued[0].reason and "will try again" in requeued[0].reason
    finally:
        store.close()


def test_a_worker_told_to_stop_leaves_an_unwritable_hand_back_to_recovery(
        small_disk: Path, parser: HumanParser, caplog: pytest.LogCaptureFixture) -> None:
    config = node_settings(small_disk / "data")
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    filling = DiskFillingParser(parser, small_disk, free_after_s=1.0)
    pauses: list[float] = []

    def stop_after_two_pauses(pause_s: float) -> bool:
        pauses.append(pause_s)
        return len(pauses) == 2

    processor = PhotoProcessor(store, spool, filling, OWNER, Router(config.routing.rules, config.peers),
                               config.intake.decode_limits(), config.results.encode_options(),
                               config.worker.max_attempts, wait_or_stop=stop_after_two_pauses)
    try:
        job_id = receive(store, spool)
        assert processor.run(store.claim_for_processing(OWNER)) is None
        assert pauses == [0.5, 1.0], "growing pauses between tries"
        assert store.get(job_id).owner == OWNER, "nothing could be written: still held"
        assert messages(caplog, "worker.handback_abandoned")
        assert filling.freed.wait(10)
        (job,) = store.release_owner(node_owners(NODE), "the node stopped", 3, charge=False)  # the next start
        assert job.state == JobState.RECEIVED and job.attempts == 0
    finally:
        store.close()


# --------------------------------------------------------------------------- the supervisor


def test_a_killed_workers_job_is_released_once_the_store_can_be_written(
        small_disk: Path, small_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real worker pool. The sweep frees a job held by a worker that is gone and leaves the live
    worker's job alone; the live worker is SIGKILLed while the disk is full: its release fails (one
    ERROR), is retried every tick, and lands once the space is back."""
    caplog.set_level(logging.INFO)
    config = node_settings(small_disk / "data", model_dir=small_model_dir,
                           worker={"count": 1, "runtime": "eager", "torch_threads": 1, "sweep_interval_s": 0.2,
                                   "poll_interval_s": 0.05, "restart_delay_s": 60.0})
    store = SqliteJobStore(config.job_db_path)
    live_owner, gone_owner = worker_owner(NODE, 0, 1), worker_owner(NODE, 0, 7)  # the pool's first start
    held = receive(store)
    assert store.claim_for_processing(live_owner).id == held
    orphan = receive(store)
    assert store.claim_for_processing(gone_owner).id == orphan
    health = Health(tmp_path / "health.json")
    pool = WorkerPool(worker_setup(config), NODE, store, health, NullMetrics(), new_doorbells())
    filler: Path | None = None
    pool.start()
    try:
        wait_until(lambda: health.ready and pool.pids, 60, "the worker to load the model")
        wait_until(lambda: any(e.reason == f"{SWEEP_REASON}; will try again (attempt 1 of 3 was cut short)"
                               for e in store.history(orphan)), 10, "the sweep to release the gone worker's job")
        time.sleep(1.0)  # five more sweeps
        job = store.get(held)
        assert job.state == JobState.PARSING and job.owner == live_owner, "a live worker's job is not touched"

        filler = fill(small_disk)
        os.kill(pool.pids[0], signal.SIGKILL)
        wait_until(lambda: messages(caplog, "worker.died"), 10, "the supervisor to see the death")
        assert "released_jobs=pending" in messages(caplog, "worker.died")[0].getMessage()
        time.sleep(1.0)  # five monitor ticks, every one trying again
        (refused,) = messages(caplog, "worker.release_failed")
        assert refused.levelno == logging.ERROR and "database or disk is full" in refused.getMessage()
        assert store.get(held).state == JobState.PARSING

        filler.unlink()
        filler = None
        job = wait_until(lambda: (j := store.get(held)).state == JobState.RECEIVED and j, 5, "the release to land")
        assert job.owner is None and job.attempts == 1 and "worker 0 died" in job.reason, "charged: a worker died"
        (landed,) = messages(caplog, "worker.jobs_released")
        assert landed.levelno == logging.INFO and f"owner={live_owner}" in landed.getMessage()
        assert len(messages(caplog, "worker.release_failed")) == 1, "one ERROR per outage"
        assert len(messages(caplog, "worker.spawned")) == 1, "the dead worker waits out restart_delay_s"
    finally:
        if filler is not None:
            filler.unlink()
        pool.stop()
        store.close()
