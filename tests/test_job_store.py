"""The job store: durable, idempotent on the SOP Instance UID, atomic claims, a history per job."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dicom_node.queue.job import JobState, NewJob, ResultObject
from dicom_node.queue.sqlite_store import SCHEMA_VERSION, SqliteJobStore
from dicom_node.queue.store import JobNotFoundError, StaleJobError

W1, W2, D1 = "n/worker-0-1/", "n/worker-1-1/", "n/dispatch-0/"


def new_job(uid: str = "1.2.3.4", ae: str = "PACS") -> NewJob:
    return NewJob(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                  transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae=ae, calling_host="127.0.0.1",
                  photo_path=f"spool/photos/{uid}.dcm")


def results(job_id: int) -> list[ResultObject]:
    return [ResultObject(kind, "1.2.3", f"9.{job_id}.{n}", "1.2.840.10008.1.2.1", f"spool/results/{job_id}/{kind}.dcm")
            for n, kind in enumerate(("seg", "sc", "sr"))]


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def to_dispatching(store: SqliteJobStore, uid: str = "1.2.3.4") -> int:
    job, _ = store.add_received(new_job(uid))
    store.claim_for_processing(W1)
    store.set_route(job.id, W1, "rule", ["pacs"])
    store.advance(job.id, W1, JobState.ENCODING)
    store.finish_encoding(job.id, W1, results(job.id), parse_s=1.5)
    return job.id


def test_a_sop_instance_received_twice_is_one_job(store: SqliteJobStore) -> None:
    first, created = store.add_received(new_job())
    again, created_again = store.add_received(new_job())
    assert created and not created_again
    assert again.id == first.id and again.state == JobState.RECEIVED
    assert store.find("1.2.3.4").id == first.id
    assert store.counts()[JobState.RECEIVED] == 1


def test_the_full_path_is_recorded_in_the_history(store: SqliteJobStore) -> None:
    job_id = to_dispatching(store)
    job = store.claim_for_dispatch(D1, lease_s=60)
    for result in job.results:
        store.record_delivery(job_id, D1, "pacs", result.sop_instance_uid)
    done = store.dispatch_succeeded(job_id, D1)
    assert done.state == JobState.DONE and done.owner is None and done.parse_s == 1.5
    assert len(done.deliveries) == 3 and done.pending("pacs") == []
    assert [(e.from_state, e.to_state) for e in store.history(job_id)] == [
        (None, JobState.RECEIVED),
        (JobState.RECEIVED, JobState.PARSING),
        (JobState.PARSING, JobState.ENCODING),
        (JobState.ENCODING, JobState.DISPATCHING),
        (JobState.DISPATCHING, JobState.DONE),
    ]


def test_claims_go_oldest_first_and_never_twice(store: SqliteJobStore) -> None:
    for n in range(30):
        store.add_received(new_job(f"1.2.{n}"))
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(owner: str) -> None:
        local = SqliteJobStore(store.path)
        while (job := local.claim_for_processing(owner)) is not None:
            with lock:
                claimed.append(job.id)
        local.close()

    threads = [threading.Thread(target=claim, args=(f"n/worker-{i}-1/",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == list(range(1, 31))
    assert store.counts()[JobState.PARSING] == 30


def test_a_late_worker_cannot_overwrite(store: SqliteJobStore) -> None:
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    store.release_owner(W1, "worker died", max_attempts=3)
    store.claim_for_processing(W2)
    with pytest.raises(StaleJobError):
        store.advance(job.id, W1, JobState.ENCODING)
    assert store.get(job.id).owner == W2


def test_released_jobs_resume_until_max_attempts_then_fail(store: SqliteJobStore) -> None:
    job, _ = store.add_received(new_job())
    for attempt in (1, 2):
        assert store.claim_for_processing(W1).attempts == attempt
        (released,) = store.release_owner("n/", "the node stopped", max_attempts=3)
        assert released.state == JobState.RECEIVED and "will try again" in released.reason
    store.claim_for_processing(W1)
    (released,) = store.release_owner("n/", "worker 0 died", max_attempts=3)
    assert released.state == JobState.FAILED and "gave up after 3 attempts" in released.reason


def test_release_is_scoped_to_the_owner_prefix(store: SqliteJobStore) -> None:
    """Recovery on one machine never touches another machine's jobs (shared store later)."""
    store.add_received(new_job("1.1"))
    store.add_received(new_job("1.2"))
    store.claim_for_processing("a/worker-0-1/")
    store.claim_for_processing("b/worker-0-1/")
    assert [j.sop_instance_uid for j in store.release_owner("a/", "gone", 3)] == ["1.1"]
    assert store.find("1.2").state == JobState.PARSING


def test_dispatch_backoff_is_persisted_and_the_limit_fails_the_job(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    job_id = to_dispatching(store)
    claimed = store.claim_for_dispatch(D1, lease_s=60)
    store.record_delivery(job_id, D1, "pacs", claimed.results[0].sop_instance_uid)
    retry_at = time.time() + 30
    store.dispatch_failed(job_id, D1, "pacs down; next attempt in 30 s", retry_at)
    store.close()

    reopened = SqliteJobStore(tmp_path / "jobs.sqlite3")  # a restart
    job = reopened.get(job_id)
    assert job.state == JobState.DISPATCHING and job.dispatch_attempts == 1
    assert job.not_before == pytest.approx(retry_at)
    assert [r.kind for r in job.pending("pacs")] == ["sc", "sr"], "what was delivered is not sent again"
    assert reopened.claim_for_dispatch(D1, lease_s=60) is None, "not before its time"
    job = reopened.claim_for_dispatch(D1, lease_s=60, now=retry_at + 1)
    failed = reopened.dispatch_failed(job_id, D1, "gave up", None)
    assert failed.state == JobState.FAILED and failed.dispatch_attempts == 2

    retried = reopened.retry(job_id)
    assert retried.state == JobState.DISPATCHING and retried.dispatch_attempts == 0 and retried.not_before is None
    assert retried.results == job.results, "a retry sends the same objects (same UIDs)"
    reopened.close()


def test_a_dispatch_lease_keeps_others_away_until_it_expires(store: SqliteJobStore) -> None:
    to_dispatching(store)
    assert store.claim_for_dispatch(D1, lease_s=60) is not None
    assert store.claim_for_dispatch("n/dispatch-1/", lease_s=60) is None
    assert store.claim_for_dispatch("n/dispatch-1/", lease_s=60, now=time.time() + 61) is not None


def test_retry_of_a_job_without_results_processes_it_again(store: SqliteJobStore) -> None:
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    store.fail(job.id, "cannot decode the photo: pixel data truncated", owner=W1)
    assert store.retry(job.id).state == JobState.RECEIVED
    with pytest.raises(StaleJobError):
        store.retry(job.id)  # only failed jobs
    with pytest.raises(JobNotFoundError):
        store.get(999)


def _add_then_die(path: str, uid: str, ready) -> None:
    store = SqliteJobStore(path)
    store.add_received(new_job(uid))
    ready.set()
    time.sleep(60)


def test_a_committed_job_survives_the_process_being_killed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_add_then_die, args=(str(tmp_path / "jobs.sqlite3"), "7.7.7", ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    assert store.find("7.7.7").state == JobState.RECEIVED
    store.close()


def test_transitions_are_logged_one_line_each(store: SqliteJobStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dicom_node.jobs")
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    store.fail(job.id, "cannot decode the photo: 16-bit samples", owner=W1)
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.jobs"]
    assert len(lines) == 3
    assert lines[-1].startswith(f"event=job job={job.id} sop=1.2.3.4 from_state=parsing to_state=failed")
    assert 'reason="cannot decode the photo: 16-bit samples"' in lines[-1]


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    """A data directory from before the retention columns opens, keeps its jobs and gains the columns."""
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    old = SqliteJobStore(path)
    job, _ = old.add_received(new_job("1.2.3.9"))
    old.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN dispatching_since")
    db.execute("ALTER TABLE jobs DROP COLUMN files_purged_at")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    store = SqliteJobStore(path)
    try:
        again = store.get(job.id)
        assert again.sop_instance_uid == "1.2.3.9" and again.files_purged_at is None
        with sqlite3.connect(path) as check:
            version = check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            assert version == str(SCHEMA_VERSION)
    finally:
        store.close()


def test_a_newer_store_is_refused_with_a_message(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    SqliteJobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="newer than this version reads"):
        SqliteJobStore(path)
