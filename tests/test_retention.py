"""Retention: the cleaner bounds the spool and never deletes what is not yet delivered.

Real SQLite job store, real spool files on disk; time is a simulated clock shared by the store and
the cleaner, so a week passes in seconds. The node test at the end runs the cleaner inside a node
started in-process, against dcmtk's storescp.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.config import NodeConfig, RetentionSettings
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.queue import sqlite_store
from dicom_node.queue.job import FINAL_STATES, Job, JobState, NewJob, ResultKind, ResultObject
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.queue.store import JobNotFoundError, StaleJobError
from dicom_node.retention.cleaner import GB, Cleaner
from dicom_node.spool.atomic import TMP_PREFIX
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import REPO, SCU_AET, StoreSCP, free_port, storescu, to_toml, wait_until, write_photos

HOUR = 3600.0
DAY = 24 * HOUR
PHOTO_SOP = "1.2.840.10008.5.1.4.1.1.77.1.4"
W, D = "sim/worker-0-1/", "sim/dispatch-0/"
NODE_AET = "DICOM_NODE"


class SimClock:
    """Epoch seconds that move only when told (whole seconds: sums of hours stay exact)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spool_bytes(spool: LocalSpool) -> int:
    """The spool's bytes on disk, counted independently of the code under test."""
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(spool.root) for f in files)


def result_dataset(payload: bytes) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.EncapsulatedDocument = payload
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def spool_photo(store: SqliteJobStore, spool: LocalSpool, payload: bytes) -> Job:
    relative = spool.write_photo(payload)
    job, created = store.add_received(NewJob(generate_uid(), PHOTO_SOP, str(ExplicitVRLittleEndian), "MOD",
                                             "127.0.0.1", relative))
    assert created
    return job


def encode(store: SqliteJobStore, spool: LocalSpool, job_id: int, sizes: list[int], rng: random.Random) -> Job:
    """PARSING (held by W) -> DISPATCHING with results written through the spool."""
    store.set_route(job_id, W, "photos", ["pacs"])
    store.advance(job_id, W, JobState.ENCODING)
    results = []
    for kind, size in zip(ResultKind, sizes, strict=True):
        ds = result_dataset(rng.randbytes(size))
        path = spool.write_result(job_id, kind, ds)
        results.append(ResultObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    str(ExplicitVRLittleEndian), path))
    return store.finish_encoding(job_id, W, results, parse_s=1.0)


def files_of(job: Job) -> list[str]:
    return [job.photo_path, *(r.path for r in job.results)]


# --------------------------------------------------------------------------- a simulated week


@dataclass
class Tracked:
    fate: str  # done | fail_processing | fail_dispatch | stuck | queued
    files: list[str] = field(default_factory=list)
    ended_at: float | None = None
    release_at: float | None = None  # stuck / queued: when the destination (or a worker) comes back


class Week:
    """Photos arriving every hour, driven through the store's real transitions; the cleaner each hour."""

    FATES = (("done", 0.78), ("fail_processing", 0.06), ("fail_dispatch", 0.06), ("stuck", 0.06), ("queued", 0.04))

    def __init__(self, data_dir: Path, settings: RetentionSettings, seed: int = 12) -> None:
        self.clock = SimClock()
        self.spool = LocalSpool(data_dir)
        self.spool.prepare()
        self.store = SqliteJobStore(data_dir / "jobs.sqlite3", clock=self.clock)
        self.metrics = NodeMetrics(process_metrics=False)
        self.settings = settings
        self.cleaner = Cleaner(settings, self.store, self.spool, self.metrics, clock=self.clock)
        self.rng = random.Random(seed)
        self.jobs: dict[int, Tracked] = {}
        self.written = 0  # every byte the spool ever held
        self.deleted = 0  # every byte the cleaner says it freed
        self.purged_jobs = 0

    def fate(self) -> str:
        roll = self.rng.random()
        for name, share in self.FATES:
            if roll < share:
                return name
            roll -= share
        return "done"

    def arrive(self) -> None:
        size = self.rng.randint(50_000, 200_000)
        job = spool_photo(self.store, self.spool, self.rng.randbytes(size))
        self.written += size
        tracked = self.jobs[job.id] = Tracked(self.fate(), [job.photo_path])
        if tracked.fate in ("stuck", "queued"):
            tracked.release_at = self.clock() + self.rng.choice((12, 30, 60, 100)) * HOUR

    def work(self) -> None:
        """What the workers and the dispatcher would do in this hour."""
        now = self.clock()
        while (job := self.store.claim_for_processing(W, now=now)) is not None:
            tracked = self.jobs[job.id]
            if tracked.fate == "queued" and now < (tracked.release_at or 0):
                self.store.requeue(job.id, W, "no worker free", not_before=tracked.release_at)  # stays RECEIVED
                continue
            if tracked.fate == "fail_processing":
                self.store.fail(job.id, "cannot decode the photo: simulated", owner=W)
                tracked.ended_at = now
                continue
            sizes = [self.rng.randint(5_000, 40_000) for _ in ResultKind]
            encoded = encode(self.store, self.spool, job.id, sizes, self.rng)
            self.written += sum(os.path.getsize(self.spool.path(r.path)) for r in encoded.results)
            tracked.files = files_of(encoded)
        while (job := self.store.claim_for_dispatch(D, lease_s=60, now=now)) is not None:
            tracked = self.jobs[job.id]
            if tracked.fate == "fail_dispatch":
                self.store.dispatch_failed(job.id, D, "association rejected (simulated)", None)
                tracked.ended_at = now
            elif tracked.fate == "stuck" and now < (tracked.release_at or 0):
                if not job.deliveries:  # the SEG got through before the PACS went away
                    self.store.record_delivery(job.id, D, "pacs", job.results[0].sop_instance_uid)
                self.store.dispatch_failed(job.id, D, "cannot connect (simulated)", retry_at=now + HOUR / 2)
            else:
                for result in job.pending("pacs"):
                    self.store.record_delivery(job.id, D, "pacs", result.sop_instance_uid)
                self.store.dispatch_succeeded(job.id, D)
                tracked.ended_at = now

    def check(self) -> None:
        """What must hold after every cleaner round."""
        now, s = self.clock(), self.settings
        assert spool_bytes(self.spool) <= s.max_spool_gb * GB
        for job_id, tracked in self.jobs.items():
            exists = [self.spool.path(p).exists() for p in tracked.files]
            try:
                job = self.store.get(job_id)
            except JobNotFoundError:
                assert tracked.ended_at is not None and now - tracked.ended_at >= s.job_history_days * DAY, job_id
                assert not any(exists), f"job {job_id}'s record is gone but its files are not"
                continue
            ended_ago = None if tracked.ended_at is None else now - tracked.ended_at
            if job.state not in FINAL_STATES:
                assert all(exists) and job.files_purged_at is None, f"undelivered job {job_id} lost files"
            elif job.state == JobState.DONE:
                assert ended_ago is not None
                if ended_ago >= s.done_after_h * HOUR:
                    assert job.files_purged_at is not None and not any(exists), f"job {job_id} kept too long"
                else:  # purged early only when the spool was over its cap, and then wholly
                    assert all(exists) if job.files_purged_at is None else not any(exists)
            else:
                assert ended_ago is not None
                if ended_ago < s.failed_after_h * HOUR:
                    assert job.files_purged_at is None and all(exists), f"failed job {job_id} lost files early"
                else:
                    assert job.files_purged_at is not None and not any(exists), f"failed job {job_id} kept"
            assert ended_ago is None or ended_ago < s.job_history_days * DAY, f"job {job_id}'s record kept"

    def hour(self, arrivals: int) -> None:
        for _ in range(arrivals):
            self.arrive()
        self.work()
        tally = self.cleaner.run_once()
        self.deleted += tally.bytes
        self.purged_jobs += tally.jobs
        self.check()
        self.clock.advance(HOUR)


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else "") + r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    assert found, f"{name} {labels} not in the metrics"
    return float(found.group(1))


def test_a_week_of_photos_stays_under_the_cap_and_never_loses_an_undelivered_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = RetentionSettings(done_after_h=24, failed_after_h=36, job_history_days=3, max_spool_gb=0.004,
                                 interval_s=HOUR)
    week = Week(tmp_path / "data", settings)
    caplog.set_level(logging.INFO, logger="dicom_node.retention")
    peak_undelivered = 0
    for hour in range(7 * 24):
        # a clinic's week: busy days, quiet nights, a quieter weekend (the cap stops binding, done_after_h acts)
        weekend, daytime = hour >= 5 * 24, 8 <= hour % 24 < 18
        week.hour(hour % 2 if weekend else 3 if daytime else hour % 2)
        undelivered = [j for j in week.store.list_jobs(limit=100_000) if j.state not in FINAL_STATES]
        peak_undelivered = max(peak_undelivered, len(undelivered))
    cap = settings.max_spool_gb * GB

    # without the cleaner the spool would have held everything ever written, several times the cap
    assert week.written > 8 * cap
    # every byte is accounted for: what was written is either still there or was reported deleted
    assert week.written == week.deleted + spool_bytes(week.spool)
    assert peak_undelivered >= 3  # undelivered jobs were there to be protected
    text = week.metrics.render().decode()
    for why in ("done_after_h", "failed_after_h", "max_spool_gb"):  # every rule had work to do
        assert metric(text, "dicom_node_retention_deleted_files_total", why=why) > 0, why
    assert metric(text, "dicom_node_retention_deleted_bytes_total", why="orphan") == 0
    assert sum(metric(text, "dicom_node_retention_deleted_bytes_total", why=w)
               for w in ("done_after_h", "failed_after_h", "max_spool_gb")) == week.deleted
    assert metric(text, "dicom_node_retention_forgotten_jobs_total") > 0
    assert metric(text, "dicom_node_spool_bytes") == spool_bytes(week.spool)
    assert metric(text, "dicom_node_retention_errors_total") == 0
    # one INFO line per deletion, with the job and the rule, and nothing of the patient
    lines = [r.getMessage() for r in caplog.records if "event=retention.deleted" in r.getMessage()]
    assert len(lines) == week.purged_jobs
    assert all(re.search(r"job=\d+ bytes=\d+ files=\d+ why=(done_after_h|failed_after_h|max_spool_gb)", line)
               for line in lines), lines[:3]
    week.store.close()


def test_over_the_cap_done_jobs_go_early_failed_and_undelivered_stay_and_a_warning_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = SimClock()
    spool = LocalSpool(tmp_path / "data")
    spool.prepare()
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3", clock=clock)
    rng = random.Random(3)
    done, failed, waiting = (spool_photo(store, spool, rng.randbytes(150_000)) for _ in range(3))
    for job in (done, failed, waiting):
        store.claim_for_processing(W, now=clock())
        encode(store, spool, job.id, [10_000] * 3, rng)
    for job_id, outcome in ((done.id, "deliver"), (failed.id, "fail"), (waiting.id, "retry")):
        claimed = store.claim_for_dispatch(D, 60, now=clock())
        assert claimed is not None and claimed.id == job_id
        if outcome == "deliver":
            for result in claimed.results:
                store.record_delivery(job_id, D, "pacs", result.sop_instance_uid)
            store.dispatch_succeeded(job_id, D)
        elif outcome == "fail":
            store.dispatch_failed(job_id, D, "rejected", None)
        else:
            store.dispatch_failed(job_id, D, "cannot connect", retry_at=clock() + DAY)
    settings = RetentionSettings(done_after_h=24, failed_after_h=24, max_spool_gb=200_000 / GB)
    cleaner = Cleaner(settings, store, spool, clock=clock)
    clock.advance(HOUR)
    caplog.set_level(logging.INFO, logger="dicom_node.retention")

    tally = cleaner.run_once()
    assert tally.jobs == 1 and tally.by_reason["max_spool_gb"].files == 4
    assert store.get(done.id).files_purged_at is not None
    assert all(spool.path(p).exists() for j in (failed, waiting) for p in files_of(store.get(j.id)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "retention" in r.name]
    assert len(warnings) == 1 and "event=retention.spool_over_cap" in warnings[0]
    assert "undelivered_jobs=1 undelivered_bytes=" in warnings[0] and "failed_jobs=1" in warnings[0]
    caplog.clear()
    assert cleaner.run_once().files == 0  # nothing more it may delete; warned again, once
    assert sum("spool_over_cap" in r.getMessage() for r in caplog.records) == 1
    store.close()


# --------------------------------------------------------------------------- orphans and errors


def test_orphans_go_after_their_grace_and_writes_in_progress_stay(tmp_path: Path) -> None:
    clock = SimClock()
    spool = LocalSpool(tmp_path / "data")
    spool.prepare()
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3", clock=clock)
    metrics = NodeMetrics(process_metrics=False)
    cleaner = Cleaner(RetentionSettings(), store, spool, metrics, clock=clock)
    now = clock()

    def aged(relative: str, age_s: float) -> str:
        os.utime(spool.path(relative), (now - age_s, now - age_s))
        return relative

    encoding = spool_photo(store, spool, b"e" * 5000)
    assert store.claim_for_processing(W, now=now) is not None
    live = spool_photo(store, spool, b"p" * 5000)  # referenced: stays whatever its age
    aged(live.photo_path, 5 * HOUR)
    store.set_route(encoding.id, W, "photos", ["pacs"])
    store.advance(encoding.id, W, JobState.ENCODING)
    half_made = aged(spool.write_result(encoding.id, "seg", result_dataset(b"s" * 3000)), 2 * HOUR)  # not recorded
    old_orphan = aged(spool.write_photo(b"o" * 7000), 2 * HOUR)  # its commit failed
    young_orphan = aged(spool.write_photo(b"y" * 7000), 10 * 60)  # perhaps being committed now
    shard = spool.path(young_orphan).parent
    writing = shard / f"{TMP_PREFIX}{'ab' * 16}.dcm.1234"  # an atomic write in progress
    writing.write_bytes(b"t" * 100)
    os.utime(writing, (now - 30, now - 30))
    stale_tmp = shard / f"{TMP_PREFIX}{'cd' * 16}.dcm.5678"  # a crash mid-write
    stale_tmp.write_bytes(b"t" * 200)
    os.utime(stale_tmp, (now - 3 * HOUR, now - 3 * HOUR))
    gone_job = aged(spool.write_result(9999, "sc", result_dataset(b"g" * 4000)), 2 * HOUR)  # no such job
    os.utime(spool.path(gone_job).parent, (now - 2 * HOUR, now - 2 * HOUR))

    tally = cleaner.run_once()
    assert not spool.path(old_orphan).exists() and not stale_tmp.exists()
    assert not spool.path(gone_job).exists() and not spool.path(gone_job).parent.exists()
    assert spool.path(young_orphan).exists() and writing.exists()
    assert spool.path(live.photo_path).exists() and spool.path(encoding.photo_path).exists()
    assert spool.path(half_made).exists()
    assert tally.by_reason["orphan"].files == 3 and tally.jobs == 0
    assert metric(metrics.render().decode(), "dicom_node_retention_deleted_files_total", why="orphan") == 3

    clock.advance(HOUR)  # now the young ones are past the grace too
    cleaner.run_once()
    assert not spool.path(young_orphan).exists() and not writing.exists()
    assert spool.path(live.photo_path).exists() and spool.path(half_made).exists()
    store.close()


def test_files_a_crash_left_after_the_mark_are_swept_and_a_missing_file_is_no_error(tmp_path: Path) -> None:
    clock = SimClock()
    spool = LocalSpool(tmp_path / "data")
    spool.prepare()
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3", clock=clock)
    metrics = NodeMetrics(process_metrics=False)
    cleaner = Cleaner(RetentionSettings(done_after_h=1), store, spool, metrics, clock=clock)
    jobs = [spool_photo(store, spool, b"x" * 9000) for _ in range(2)]
    for job in jobs:
        store.claim_for_processing(W, now=clock())
        store.advance(job.id, W, JobState.DONE, "not processed: no routing rule matches this photo")
    spool.path(jobs[0].photo_path).unlink()  # already gone (deleted by hand)
    clock.advance(2 * HOUR)
    # a crash between marking job 2 and deleting its photo
    assert store.mark_files_purged(jobs[1].id, clock(), "photo and results deleted (done_after_h)") is not None
    os.utime(spool.path(jobs[1].photo_path), (clock() - 2 * HOUR,) * 2)

    tally = cleaner.run_once()
    assert store.get(jobs[0].id).files_purged_at is not None and tally.by_reason["done_after_h"].files == 0
    assert not spool.path(jobs[1].photo_path).exists() and tally.by_reason["orphan"].bytes == 9000
    assert metric(metrics.render().decode(), "dicom_node_retention_errors_total") == 0
    store.close()


def test_a_locked_job_store_is_logged_and_the_next_round_catches_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sqlite3

    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.2)  # SQLite's own "database is locked", sooner
    clock = SimClock()
    spool = LocalSpool(tmp_path / "data")
    spool.prepare()
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3", clock=clock)
    metrics = NodeMetrics(process_metrics=False)
    cleaner = Cleaner(RetentionSettings(done_after_h=1, job_history_days=0), store, spool, metrics, clock=clock)
    job = spool_photo(store, spool, b"x" * 9000)
    store.claim_for_processing(W, now=clock())
    store.advance(job.id, W, JobState.DONE, "not processed")
    clock.advance(2 * HOUR)

    other = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        tally = cleaner.run_once()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert tally.files == 0 and spool.path(job.photo_path).exists()
    assert metric(metrics.render().decode(), "dicom_node_retention_errors_total") >= 1
    assert any("event=retention.error" in r.getMessage() and "locked" in r.getMessage() for r in caplog.records)

    tally = cleaner.run_once()
    assert tally.files == 1 and tally.forgotten == 1 and not spool.path(job.photo_path).exists()
    with pytest.raises(JobNotFoundError):
        store.get(job.id)
    store.close()


def test_retry_of_a_purged_failed_job_is_refused_clearly(tmp_path: Path) -> None:
    clock = SimClock()
    spool = LocalSpool(tmp_path / "data")
    spool.prepare()
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3", clock=clock)
    job = spool_photo(store, spool, b"x" * 1000)
    store.claim_for_processing(W, now=clock())
    store.fail(job.id, "cannot decode the photo", owner=W)
    clock.advance(3 * HOUR)
    Cleaner(RetentionSettings(failed_after_h=2), store, spool, clock=clock).run_once()
    with pytest.raises(StaleJobError, match=r"deleted by retention at .*cannot be retried"):
        store.retry(job.id)
    assert store.get(job.id).state == JobState.FAILED
    assert store.history(job.id)[-1].reason == "photo and results deleted (failed_after_h)"
    store.close()


# --------------------------------------------------------------------------- by hand: `dicom-node jobs purge`


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_jobs_purge_deletes_what_it_says_and_dry_run_deletes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"data_dir": str(data)}))
    clock = SimClock(float(int(time.time())) - 10 * DAY)  # jobs that ended ten days ago ...
    spool = LocalSpool(data)
    spool.prepare()
    store = SqliteJobStore(data / "jobs.sqlite3", clock=clock)
    rng = random.Random(5)
    old_done, old_failed, old_waiting = (spool_photo(store, spool, rng.randbytes(60_000)) for _ in range(3))
    for job in (old_done, old_failed, old_waiting):
        store.claim_for_processing(W, now=clock())
        encode(store, spool, job.id, [10_000] * 3, rng)
    for outcome in ("deliver", "fail", "retry"):
        claimed = store.claim_for_dispatch(D, 60, now=clock())
        assert claimed is not None
        if outcome == "deliver":
            for result in claimed.results:
                store.record_delivery(claimed.id, D, "pacs", result.sop_instance_uid)
            store.dispatch_succeeded(claimed.id, D)
        elif outcome == "fail":
            store.dispatch_failed(claimed.id, D, "rejected", None)
        else:
            store.dispatch_failed(claimed.id, D, "cannot connect", retry_at=clock() + 20 * DAY)
    clock.advance(9 * DAY)  # ... and one that ended a day ago
    recent = spool_photo(store, spool, rng.randbytes(60_000))
    store.claim_for_processing(W, now=clock())
    store.advance(recent.id, W, JobState.DONE, "not processed")
    jobs = {j.id: files_of(j) for j in store.list_jobs()}
    store.close()
    old_bytes = sum(spool.path(p).stat().st_size for j in (old_done, old_failed) for p in jobs[j.id])
    on_disk = {p: spool.path(p).read_bytes() for paths in jobs.values() for p in paths}

    dry = cli("jobs", "purge", "--older-than", "7d", "--dry-run", "--config", str(config))
    assert dry.returncode == 0, dry.stderr
    assert f"would delete: job {old_done.id} (done" in dry.stdout
    assert f"would delete: job {old_failed.id} (failed" in dry.stdout
    assert f"job {old_waiting.id} " not in dry.stdout and f"job {recent.id} " not in dry.stdout
    assert f"dry run: would purge 2 jobs: 8 files, {old_bytes} bytes" in dry.stdout
    assert all(spool.path(p).read_bytes() == content for p, content in on_disk.items())

    assert cli("jobs", "purge", "--older-than", "7 weeks", "--config", str(config)).returncode == 2
    done = cli("jobs", "purge", "--older-than", "168h", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"purged 2 jobs: 8 files, {old_bytes} bytes" in done.stdout
    for job_id, paths in jobs.items():
        kept = job_id in (old_waiting.id, recent.id)
        assert all(spool.path(p).exists() == kept for p in paths), job_id
    assert "event=retention.deleted" in done.stderr and "why=by_hand" in done.stderr

    shown = cli("jobs", "show", str(old_done.id), "--config", str(config))
    assert "photo and results deleted by retention at" in shown.stdout
    as_json = json.loads(cli("jobs", "show", str(old_done.id), "--json", "--config", str(config)).stdout)
    assert as_json["files_purged_at"] is not None
    retried = cli("jobs", "retry", str(old_failed.id), "--config", str(config))
    assert retried.returncode == 1
    assert f"job {old_failed.id}: not retried: job {old_failed.id}'s photo and results were deleted" in retried.stderr

    forgot = cli("jobs", "purge", "--older-than", "10080m", "--forget", "--config", str(config))
    assert forgot.returncode == 0 and "purged 0 jobs: 0 files, 0 bytes (0.0 kB); forgot 2 job records" in forgot.stdout
    assert cli("jobs", "show", str(old_done.id), "--config", str(config)).returncode == 1
    listed = cli("jobs", "list", "--json", "--config", str(config))
    assert sorted(j["id"] for j in json.loads(listed.stdout)["jobs"]) == sorted([old_waiting.id, recent.id])


# --------------------------------------------------------------------------- in a running node


def test_a_running_node_deletes_a_delivered_jobs_files(small_model_dir: Path, tmp_path: Path) -> None:
    from dicom_node.node import Node
    from tests.photo_factory import make_vl_photo, synthetic_rgb

    pacs = StoreSCP(tmp_path / "pacs").start()
    config = NodeConfig(
        ae_title=NODE_AET, port=free_port(), node_id="retention", data_dir=tmp_path / "data",
        model_dir=small_model_dir, auto_fetch_model=False,
        callers=[{"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}],
        worker={"count": 1, "torch_threads": 1, "poll_interval_s": 0.05},
        dispatch={"timeout_s": 10.0, "poll_interval_s": 0.05},
        http={"enabled": False},
        retention={"done_after_h": 0, "interval_s": 0.2},
    )
    node = Node(config)
    node.start()
    try:
        assert node.store is not None and node.metrics is not None
        photo = make_vl_photo(synthetic_rgb(48, 64))
        sent = storescu(write_photos([photo], tmp_path / "in"), node.intake.port if node.intake else 0)
        assert sent.returncode == 0, sent.stderr
        store = node.store
        job = wait_until(lambda: store.find(photo.SOPInstanceUID), 30, "the photo's job")
        purged = wait_until(lambda: (j := store.get(job.id)).files_purged_at and j, 90,
                            "the delivered job's files to be deleted")
        assert purged.state == JobState.DONE and len(pacs.files()) == 3
        assert not node.spool.path(purged.photo_path).exists()
        assert not any(node.spool.path(r.path).exists() for r in purged.results)
        kept_parsing = Path(node.spool.path(purged.results[0].path)).parent / "parsing.npz"
        assert not kept_parsing.exists(), "the parsing kept for a lesion SEG is PHI too"
        text = node.metrics.render().decode()
        # the photo, its SEG, SC and SR, and the parsing kept for a later lesion SEG (issue 15)
        assert metric(text, "dicom_node_retention_deleted_files_total", why="done_after_h") == 5
    finally:
        node.stop()
        pacs.stop()
