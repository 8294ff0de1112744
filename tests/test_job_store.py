"""The job store: durable, idempotent on the SOP Instance UID, atomic claims, a history per job.

The contract is run against both engines: the embedded SQLite file and a shared PostgreSQL
database (a real server, tests/postgres_fixtures.py). What only one engine has (migrating an old
SQLite file, PostgreSQL's row locks and lost connections) is tested for that engine alone.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from dicom_node.cli import build_parser, jobs_migrate
from dicom_node.config import ConfigError, load_config
from dicom_node.queue.factory import open_job_store
from dicom_node.queue.job import JobKind, JobState, NewJob, ResultObject
from dicom_node.queue.postgres_store import SCHEMA_VERSION as PG_SCHEMA_VERSION
from dicom_node.queue.postgres_store import PostgresJobStore
from dicom_node.queue.sqlite_store import SCHEMA_VERSION, SqliteJobStore
from dicom_node.queue.store import JobNotFoundError, JobStore, JobStoreUnavailableError, StaleJobError

if TYPE_CHECKING:
    from tests.postgres_fixtures import PostgresServer

# The PostgreSQL server and a database per test (postgres_server, postgres_url).
pytest_plugins = ("tests.postgres_fixtures",)

W1, W2, D1 = "n/worker-0-1/", "n/worker-1-1/", "n/dispatch-0/"


def new_job(uid: str = "1.2.3.4", ae: str = "PACS", kind: JobKind = JobKind.PHOTO,
            source_uid: str | None = None) -> NewJob:
    return NewJob(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                  transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae=ae, calling_host="127.0.0.1",
                  photo_path=f"spool/photos/{uid}.dcm", kind=kind, source_uid=source_uid)


def results(job_id: int) -> list[ResultObject]:
    return [ResultObject(kind, "1.2.3", f"9.{job_id}.{n}", "1.2.840.10008.1.2.1", f"spool/results/{job_id}/{kind}.dcm")
            for n, kind in enumerate(("seg", "sc", "sr"))]


class Backing:
    """Where a store's records live (a SQLite file, a PostgreSQL database); each ``open()`` is another
    instance on them: a restart, another process's store, another node."""

    def __init__(self, engine: str, target: str) -> None:
        self.engine = engine
        self.target = target
        self.opened: list[JobStore] = []

    def open(self) -> JobStore:
        store: JobStore = SqliteJobStore(self.target) if self.engine == "sqlite" else PostgresJobStore(self.target)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backing]:
    if request.param == "sqlite":
        b = Backing("sqlite", str(tmp_path / "jobs.sqlite3"))
    else:
        b = Backing("postgresql", request.getfixturevalue("postgres_url"))
    yield b
    for store in b.opened:
        store.close()


@pytest.fixture
def store(backing: Backing) -> JobStore:
    return backing.open()


def to_dispatching(store: JobStore, uid: str = "1.2.3.4", study_uid: str | None = None) -> int:
    job, _ = store.add_received(new_job(uid))
    claimed = store.claim_for_processing(W1)
    assert claimed is not None and claimed.id == job.id
    store.set_route(job.id, W1, "rule", ["pacs"], study_uid=study_uid)
    store.advance(job.id, W1, JobState.ENCODING)
    store.finish_encoding(job.id, W1, results(job.id), parse_s=1.5)
    return job.id


# ---------------------------------------------------------------------- the contract, both engines


def test_a_sop_instance_received_twice_is_one_job(store: JobStore) -> None:
    first, created = store.add_received(new_job())
    again, created_again = store.add_received(new_job())
    assert created and not created_again
    assert again.id == first.id and again.state == JobState.RECEIVED
    assert store.find("1.2.3.4").id == first.id
    assert store.find("9.9.9") is None
    assert store.counts()[JobState.RECEIVED] == 1


def test_the_full_path_is_recorded_in_the_history(store: JobStore) -> None:
    job_id = to_dispatching(store)
    job = store.claim_for_dispatch(D1, lease_s=60)
    for result in job.results:
        store.record_delivery(job_id, D1, "pacs", result.sop_instance_uid)
    store.record_delivery(job_id, D1, "pacs", job.results[0].sop_instance_uid)  # a repeat is no second row
    done = store.dispatch_succeeded(job_id, D1)
    assert done.state == JobState.DONE and done.owner is None and done.parse_s == 1.5
    assert len(done.deliveries) == 3 and done.pending("pacs") == []
    assert [r.kind for r in done.results] == ["seg", "sc", "sr"] and done.destinations == ("pacs",)
    assert [(e.from_state, e.to_state) for e in store.history(job_id)] == [
        (None, JobState.RECEIVED),
        (JobState.RECEIVED, JobState.PARSING),
        (JobState.PARSING, JobState.ENCODING),
        (JobState.ENCODING, JobState.DISPATCHING),
        (JobState.DISPATCHING, JobState.DONE),
    ]
    assert [j.id for j in store.list_jobs([JobState.DONE])] == [job_id]
    assert store.list_jobs([JobState.RECEIVED, JobState.FAILED]) == []


def test_claims_go_oldest_first_and_never_twice(backing: Backing) -> None:
    store = backing.open()
    for n in range(30):
        store.add_received(new_job(f"1.2.{n}"))
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claim(owner: str, local: JobStore) -> None:
        start.wait()
        while (job := local.claim_for_processing(owner)) is not None:
            with lock:
                claimed.append(job.id)

    stores = [backing.open() for _ in range(4)]  # each worker process opens its own
    threads = [threading.Thread(target=claim, args=(f"n/worker-{i}-1/", stores[i])) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == list(range(1, 31))
    assert store.counts()[JobState.PARSING] == 30
    assert [j.id for j in store.list_jobs(limit=3)] == [30, 29, 28], "newest first"


def test_a_late_worker_cannot_overwrite(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    store.release_owner(W1, "worker died", max_attempts=3)
    store.claim_for_processing(W2)
    for late_write in (lambda: store.advance(job.id, W1, JobState.ENCODING),
                       lambda: store.set_route(job.id, W1, "rule", ["pacs"]),
                       lambda: store.requeue(job.id, W1, "disk full"),
                       lambda: store.fail(job.id, "late", owner=W1)):
        with pytest.raises(StaleJobError, match="held by n/worker-1-1/"):
            late_write()
    assert store.get(job.id).owner == W2 and store.get(job.id).state == JobState.PARSING


def test_a_dispatcher_whose_lease_ran_out_cannot_write(store: JobStore) -> None:
    job_id = to_dispatching(store)
    store.claim_for_dispatch(D1, lease_s=60)
    assert store.claim_for_dispatch("n/dispatch-1/", lease_s=60, now=time.time() + 61) is not None
    with pytest.raises(StaleJobError):
        store.record_delivery(job_id, D1, "pacs", "9.1.0")
    with pytest.raises(StaleJobError):
        store.dispatch_succeeded(job_id, D1)
    assert store.get(job_id).deliveries == frozenset() and store.get(job_id).owner == "n/dispatch-1/"


def test_released_jobs_resume_until_max_attempts_then_fail(store: JobStore) -> None:
    store.add_received(new_job())
    for attempt in (1, 2):
        assert store.claim_for_processing(W1).attempts == attempt
        (released,) = store.release_owner("n/", "the node stopped", max_attempts=3)
        assert released.state == JobState.RECEIVED and "will try again" in released.reason
    store.claim_for_processing(W1)
    (released,) = store.release_owner("n/", "worker 0 died", max_attempts=3)
    assert released.state == JobState.FAILED and "gave up after 3 attempts" in released.reason


def test_a_node_stop_is_not_charged_and_held_jobs_names_the_holders(store: JobStore) -> None:
    dispatching = to_dispatching(store, "1.2")
    store.add_received(new_job("1.1"))
    store.claim_for_processing(W2)
    store.claim_for_dispatch(D1, lease_s=600)
    assert [(j.sop_instance_uid, j.owner) for j in store.held_jobs("n/")] == [("1.2", D1), ("1.1", W2)]
    assert [j.id for j in store.held_jobs("n/", [JobState.DISPATCHING])] == [dispatching]
    assert store.held_jobs("n_") == [], "a LIKE wildcard in a prefix is taken literally"
    (released,) = store.release_owner("n/", "the node stopped", max_attempts=1, charge=False)
    assert released.state == JobState.RECEIVED and released.attempts == 0 and "not counted" in released.reason
    lease_dropped = store.get(dispatching)
    assert lease_dropped.owner is None and lease_dropped.state == JobState.DISPATCHING
    assert store.claim_for_dispatch("m/dispatch-0/", lease_s=60) is not None, "due at once, as it was"


def test_release_is_scoped_to_the_owner_prefix(store: JobStore) -> None:
    """Recovery on one machine never touches another machine's jobs (a shared store)."""
    store.add_received(new_job("1.1"))
    store.add_received(new_job("1.2"))
    store.claim_for_processing("a/worker-0-1/")
    store.claim_for_processing("b/worker-0-1/")
    assert [j.sop_instance_uid for j in store.release_owner("a/", "gone", 3)] == ["1.1"]
    assert store.find("1.2").state == JobState.PARSING


def test_a_requeued_job_waits_for_its_backoff(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    later = time.time() + 30
    requeued = store.requeue(job.id, W1, "out of memory", not_before=later)
    assert requeued.state == JobState.RECEIVED and requeued.not_before == pytest.approx(later)
    assert store.claim_for_processing(W1) is None
    again = store.claim_for_processing(W1, now=later + 1)
    assert again is not None and again.attempts == 2 and again.not_before is None and again.reason is None


def test_dispatch_backoff_is_persisted_and_the_limit_fails_the_job(backing: Backing) -> None:
    store = backing.open()
    job_id = to_dispatching(store)
    claimed = store.claim_for_dispatch(D1, lease_s=60)
    store.record_delivery(job_id, D1, "pacs", claimed.results[0].sop_instance_uid)
    retry_at = time.time() + 30
    store.dispatch_failed(job_id, D1, "pacs down; next attempt in 30 s", retry_at)
    store.close()

    reopened = backing.open()  # a restart
    job = reopened.get(job_id)
    assert job.state == JobState.DISPATCHING and job.dispatch_attempts == 1
    assert job.not_before == retry_at, "epoch seconds come back exactly"
    assert [r.kind for r in job.pending("pacs")] == ["sc", "sr"], "what was delivered is not sent again"
    assert reopened.claim_for_dispatch(D1, lease_s=60) is None, "not before its time"
    job = reopened.claim_for_dispatch(D1, lease_s=60, now=retry_at + 1)
    failed = reopened.dispatch_failed(job_id, D1, "gave up", None)
    assert failed.state == JobState.FAILED and failed.dispatch_attempts == 2

    retried = reopened.retry(job_id)
    assert retried.state == JobState.DISPATCHING and retried.dispatch_attempts == 0 and retried.not_before is None
    assert retried.results == job.results, "a retry sends the same objects (same UIDs)"


def test_a_dispatch_lease_keeps_others_away_until_it_expires(store: JobStore) -> None:
    to_dispatching(store)
    assert store.claim_for_dispatch(D1, lease_s=60) is not None
    assert store.claim_for_dispatch("n/dispatch-1/", lease_s=60) is None
    assert store.claim_for_dispatch("n/dispatch-1/", lease_s=60, now=time.time() + 61) is not None


# Another node's workers (issue 16): a processing claim is a lease; one that runs out is taken over.
A1, B1 = "a/worker-0-1/", "b/worker-0-1/"


def test_a_processing_lease_that_runs_out_is_taken_over_by_another_node(backing: Backing) -> None:
    node_a, node_b = backing.open(), backing.open()
    job, _ = node_a.add_received(new_job())
    t0 = time.time()
    claimed = node_a.claim_for_processing(A1, now=t0, lease_s=30)
    assert claimed is not None and claimed.attempts == 1
    node_a.advance(job.id, A1, JobState.ENCODING)
    assert node_b.claim_for_processing(B1, now=t0 + 29, lease_s=30) is None, "a live lease keeps others away"

    taken = node_b.claim_for_processing(B1, now=t0 + 31, lease_s=30)
    assert taken is not None and taken.id == job.id
    assert taken.state == JobState.PARSING and taken.owner == B1 and taken.attempts == 2, "counted as an attempt"
    assert taken.results == ()
    assert [(e.from_state, e.to_state, e.reason) for e in node_b.history(job.id)][-2:] == [
        (JobState.ENCODING, JobState.RECEIVED,
         f"lease of {A1} expired (node presumed dead); taken over by {B1}"),
        (JobState.RECEIVED, JobState.PARSING, None),
    ]
    # the new holder finishes it; the old holder's results never land
    node_b.advance(job.id, B1, JobState.ENCODING)
    done = node_b.finish_encoding(job.id, B1, results(job.id), parse_s=1.0)
    assert done.state == JobState.DISPATCHING and done.owner is None


def test_a_renewed_lease_is_not_taken_over(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    t0 = time.time()
    store.claim_for_processing(A1, now=t0, lease_s=10)
    for tick in range(1, 6):  # a long parse: renewed every 5 s, 25 s in all
        assert store.renew_lease(job.id, A1, lease_s=10, now=t0 + 5 * tick) == t0 + 5 * tick + 10
        assert store.claim_for_processing(B1, now=t0 + 5 * tick + 9, lease_s=10) is None
    assert store.get(job.id).owner == A1
    taken = store.claim_for_processing(B1, now=t0 + 36, lease_s=10)
    assert taken is not None and taken.owner == B1, "once renewals stop, the lease runs out"


def test_a_stale_holder_is_refused_after_a_take_over(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    t0 = time.time()
    store.claim_for_processing(A1, now=t0, lease_s=5)
    taken = store.claim_for_processing(B1, now=t0 + 6, lease_s=60)
    assert taken is not None and taken.owner == B1
    for late_write in (lambda: store.renew_lease(job.id, A1, lease_s=5),
                       lambda: store.advance(job.id, A1, JobState.ENCODING),
                       lambda: store.set_route(job.id, A1, "rule", ["pacs"]),
                       lambda: store.finish_encoding(job.id, A1, results(job.id), parse_s=1.0),
                       lambda: store.requeue(job.id, A1, "disk full"),
                       lambda: store.fail(job.id, "late", owner=A1)):
        with pytest.raises(StaleJobError, match=f"held by {B1}"):
            late_write()
    job_now = store.get(job.id)
    assert job_now.owner == B1 and job_now.state == JobState.PARSING and job_now.results == ()
    assert store.renew_lease(job.id, B1, lease_s=60) > t0, "the new holder renews"
    store.advance(job.id, B1, JobState.DONE)
    with pytest.raises(StaleJobError):  # a job no longer in processing has no lease to renew
        store.renew_lease(job.id, B1, lease_s=60)


def test_a_photo_that_kills_every_node_fails_after_max_attempts(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    store.add_received(new_job("1.2.3.5"))
    t0 = time.time()
    first = store.claim_for_processing("a/worker-0-1/", now=t0, lease_s=5, max_attempts=2)
    assert first is not None and first.id == job.id
    now = t0
    second = None
    for owner in ("b/worker-0-1/", "c/worker-0-1/"):  # each holder dies in turn
        now += 6
        second = store.claim_for_processing(owner, now=now, lease_s=5, max_attempts=2)
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.owner is None and failed.attempts == 2
    assert failed.reason == "lease of b/worker-0-1/ expired (node presumed dead); gave up after 2 attempts"
    assert second is not None and second.sop_instance_uid == "1.2.3.5", "the claim goes on to the next job"


def test_dispatching_jobs_are_never_taken_over_by_a_processing_claim(store: JobStore) -> None:
    job_id = to_dispatching(store)
    store.claim_for_dispatch(D1, lease_s=5)
    assert store.claim_for_processing(W2, now=time.time() + 3600) is None
    assert store.get(job_id).state == JobState.DISPATCHING and len(store.get(job_id).results) == 3


def test_retry_of_a_job_without_results_processes_it_again(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    store.fail(job.id, "cannot decode the photo: pixel data truncated", owner=W1)
    assert store.retry(job.id).state == JobState.RECEIVED
    with pytest.raises(StaleJobError):
        store.retry(job.id)  # only failed jobs
    with pytest.raises(JobNotFoundError):
        store.get(999)


def test_set_route_records_the_study_and_keeps_it(store: JobStore) -> None:
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    assert store.set_route(job.id, W1, "r", ["a", "b"], study_uid="1.9").study_uid == "1.9"
    routed = store.set_route(job.id, W1, None, [])
    assert routed.study_uid == "1.9" and routed.rule is None and routed.destinations == ()


def test_a_lesion_job_waits_for_its_photo_then_runs(store: JobStore) -> None:
    photo, _ = store.add_received(new_job("1.1"))
    lesion, _ = store.add_received(new_job("2.1", kind=JobKind.LESION, source_uid="1.1"))
    assert lesion.kind == JobKind.LESION and lesion.source_uid == "1.1"
    assert [j.id for j in store.waiting_lesion_jobs()] == [lesion.id]
    assert store.waiting_lesion_jobs(waiting_since_before=lesion.updated_at - 1) == []
    claimed = store.claim_for_processing(W1)
    assert claimed.id == photo.id and store.claim_for_processing(W2) is None, "the lesion waits for the parse"
    store.set_route(photo.id, W1, "rule", ["pacs"], study_uid="7.7")
    store.advance(photo.id, W1, JobState.ENCODING)
    store.finish_encoding(photo.id, W1, results(photo.id), parse_s=2.0)
    assert store.waiting_lesion_jobs() == []
    assert store.fail_waiting(lesion.id, time.time() + 1, "no photo") is None, "its photo is parsed now"
    running = store.claim_for_processing(W2)
    assert running is not None and running.id == lesion.id
    store.advance(lesion.id, W2, JobState.ENCODING)
    store.finish_encoding(lesion.id, W2, results(lesion.id)[2:], parse_s=None)
    assert [j.id for j in store.study_lesion_jobs("7.7")] == [lesion.id]
    assert store.study_lesion_jobs("7.8") == []


def test_a_lesion_job_whose_photo_never_comes_fails(store: JobStore) -> None:
    lesion, _ = store.add_received(new_job("2.1", kind=JobKind.LESION, source_uid="1.404"))
    assert store.fail_waiting(lesion.id, lesion.updated_at - 1, "too soon") is None
    failed = store.fail_waiting(lesion.id, time.time() + 1, "its photo did not arrive within 24 h")
    assert failed is not None and failed.state == JobState.FAILED
    assert failed.reason == "its photo did not arrive within 24 h"
    assert store.fail_waiting(lesion.id, time.time() + 1, "again") is None


def test_retention_marks_files_then_forgets_ended_jobs(store: JobStore) -> None:
    done_id = to_dispatching(store, "1.1")
    store.claim_for_dispatch(D1, lease_s=60)
    store.dispatch_succeeded(done_id, D1)
    failed, _ = store.add_received(new_job("1.2"))
    store.fail(failed.id, "refused by hand")
    waiting, _ = store.add_received(new_job("1.3"))
    horizon = time.time() + 1
    assert [j.id for j in store.jobs_with_files()] == [done_id, failed.id, waiting.id], "longest unchanged first"
    assert [j.id for j in store.jobs_with_files([JobState.DONE, JobState.FAILED], horizon, limit=1)] == [done_id]
    assert store.jobs_with_files(ended_before=store.get(done_id).updated_at - 1) == []
    assert store.mark_files_purged(waiting.id, horizon, "purged") is None, "never a job not yet ended"
    assert store.mark_files_purged(done_id, store.get(done_id).updated_at - 1, "purged") is None, "not yet due"
    for job_id in (done_id, failed.id):
        purged = store.mark_files_purged(job_id, horizon, "files deleted by retention")
        assert purged is not None and purged.files_purged_at is not None
        assert store.history(job_id)[-1].reason == "files deleted by retention"
    assert store.mark_files_purged(done_id, horizon, "twice") is None
    with pytest.raises(StaleJobError, match="deleted by retention"):
        store.retry(failed.id)
    assert [j.id for j in store.jobs_with_files()] == [waiting.id]
    assert store.forget_jobs(horizon, limit=1) == [done_id]
    assert sorted(store.forget_jobs(horizon)) == [failed.id]
    with pytest.raises(JobNotFoundError):
        store.get(done_id)
    assert store.history(done_id) == [] and store.counts()[JobState.RECEIVED] == 1


def _add_then_die(engine: str, target: str, uid: str, ready) -> None:
    store = SqliteJobStore(target) if engine == "sqlite" else PostgresJobStore(target)
    store.add_received(new_job(uid))
    ready.set()
    time.sleep(60)


def test_a_committed_job_survives_the_process_being_killed(backing: Backing) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_add_then_die, args=(backing.engine, backing.target, "7.7.7", ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    store = backing.open()
    assert store.find("7.7.7").state == JobState.RECEIVED


def test_transitions_are_logged_one_line_each(store: JobStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dicom_node.jobs")
    job, _ = store.add_received(new_job())
    store.claim_for_processing(W1)
    store.fail(job.id, "cannot decode the photo: 16-bit samples", owner=W1)
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.jobs"]
    assert len(lines) == 3
    assert lines[-1].startswith(f"event=job job={job.id} sop=1.2.3.4 from_state=parsing to_state=failed")
    assert 'reason="cannot decode the photo: 16-bit samples"' in lines[-1]


def test_a_newer_store_is_refused_with_a_message(backing: Backing) -> None:
    backing.open().close()
    if backing.engine == "sqlite":
        with sqlite3.connect(backing.target) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    else:
        with psycopg.connect(backing.target, autocommit=True) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="newer than this version reads"):
        backing.open()


# ---------------------------------------------------------------------- SQLite only


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    """A data directory from before the retention columns opens, keeps its jobs and gains the columns."""
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


# ---------------------------------------------------------------------- PostgreSQL only


def test_the_postgres_schema_follows_the_sqlite_one(postgres_url: str, tmp_path: Path) -> None:
    """A column added to one engine and not the other fails here, not in a node that shares a store."""
    assert PG_SCHEMA_VERSION == SCHEMA_VERSION
    SqliteJobStore(tmp_path / "jobs.sqlite3").close()
    PostgresJobStore(postgres_url).close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as lite, psycopg.connect(postgres_url) as pg:
        for table in ("jobs", "job_results", "deliveries", "job_events"):
            sqlite_columns = [row[1] for row in lite.execute(f"PRAGMA table_info({table})")]
            pg_columns = [row[0] for row in pg.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                (table,))]
            assert sorted(pg_columns) == sorted(sqlite_columns), table


def test_stores_starting_at_once_on_a_fresh_database_all_start(postgres_url: str) -> None:
    start = threading.Barrier(4)
    opened: list[PostgresJobStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(PostgresJobStore(postgres_url))
        except BaseException as exc:  # noqa: BLE001 - any failure of any starter is the finding
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(opened) == 4
        with psycopg.connect(postgres_url) as db:
            assert db.execute("SELECT key, value FROM meta").fetchall() == [("schema_version", str(SCHEMA_VERSION))]
    finally:
        for s in opened:
            s.close()


def test_two_postgres_stores_never_claim_one_job_twice(postgres_url: str) -> None:
    """Two nodes (two stores, two connections each) draining one queue at once."""
    nodes = [PostgresJobStore(postgres_url), PostgresJobStore(postgres_url)]
    try:
        for n in range(20):
            nodes[0].add_received(new_job(f"1.3.{n}"))
        claimed: list[tuple[int, str]] = []
        lock = threading.Lock()
        start = threading.Barrier(4)

        def claim(node: PostgresJobStore, owner: str) -> None:
            start.wait()
            while (job := node.claim_for_processing(owner)) is not None:
                with lock:
                    claimed.append((job.id, owner))

        threads = [threading.Thread(target=claim, args=(nodes[i % 2], f"node{i % 2}/worker-{i}-1/"))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(job_id for job_id, _ in claimed) == list(range(1, 21)), "each job claimed exactly once"
        for job_id, owner in claimed:
            job = nodes[1].get(job_id)
            assert job.owner == owner and job.attempts == 1, "the recorded holder is the one that got it"
            assert [e.to_state for e in nodes[1].history(job_id)] == [JobState.RECEIVED, JobState.PARSING]
    finally:
        for node in nodes:
            node.close()


def test_a_claimer_passes_over_a_job_another_is_taking(postgres_url: str) -> None:
    store = PostgresJobStore(postgres_url)
    try:
        first, _ = store.add_received(new_job("1.1"))
        second, _ = store.add_received(new_job("1.2"))
        with psycopg.connect(postgres_url) as other:  # another node, mid-claim: the row is locked
            other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
            began = time.monotonic()
            claimed = store.claim_for_processing(W1)
            assert claimed is not None and claimed.id == second.id
            assert time.monotonic() - began < 5, "SKIP LOCKED: no wait for the other claimer"
            other.rollback()
        assert store.claim_for_processing(W2).id == first.id
    finally:
        store.close()


def test_a_lost_connection_is_unavailable_then_reconnects(postgres_server: PostgresServer, postgres_url: str) -> None:
    store = PostgresJobStore(postgres_url)
    try:
        job, _ = store.add_received(new_job())
        dbname = postgres_url.rsplit("/", 1)[1]
        with postgres_server.admin() as admin:  # the server restarts, a firewall drops the connection
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = %s AND application_name = 'dicom-node'", (dbname,)).fetchall()
        assert killed, "the store's connection was found"
        with pytest.raises(JobStoreUnavailableError, match="127.0.0.1"):
            store.claim_for_processing(W1)
        claimed = store.claim_for_processing(W1)  # the next call connects again
        assert claimed is not None and claimed.id == job.id
    finally:
        store.close()


def test_an_unreachable_server_is_unavailable_and_the_password_stays_out() -> None:
    with socket.socket() as nobody_listens:  # bound, never listening: connections are refused
        nobody_listens.bind(("127.0.0.1", 0))
        url = f"postgresql://dicom:s3cret-pw@127.0.0.1:{nobody_listens.getsockname()[1]}/jobs?connect_timeout=2"
        with pytest.raises(JobStoreUnavailableError) as raised:
            PostgresJobStore(url)
    assert "s3cret-pw" not in str(raised.value) and "dicom:***@127.0.0.1" in str(raised.value)


def test_the_configuration_picks_the_engine_and_never_shows_the_password(
        postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    default = load_config(config_path)
    assert default.job_store.engine == "sqlite"
    sqlite_store = open_job_store(default.job_db_path, default.job_store.url)
    assert isinstance(sqlite_store, SqliteJobStore)
    sqlite_store.close()

    dbname = postgres_url.rsplit("/", 1)[1]
    monkeypatch.setenv("DICOM_NODE_JOB_STORE__URL", postgres_server.url(dbname, password=postgres_server.password))
    config = load_config(config_path)
    assert config.job_store.engine == "postgresql" and postgres_server.password not in repr(config)
    caplog.set_level("DEBUG")
    shared = open_job_store(config.job_db_path, config.job_store.url)
    try:
        assert isinstance(shared, PostgresJobStore)
        assert shared.add_received(new_job())[1]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "engine=postgresql" in logged and "postgres:***@127.0.0.1" in logged
        assert postgres_server.password not in logged
    finally:
        shared.close()

    # the password from libpq's environment instead of the URL; a wrong one is refused, unrepeated
    monkeypatch.setenv("DICOM_NODE_JOB_STORE__URL", postgres_server.url(dbname, password=None))
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    from_env = open_job_store(config.job_db_path, load_config(config_path).job_store.url)
    try:
        assert from_env.find("1.2.3.4") is not None
    finally:
        from_env.close()
    with pytest.raises(JobStoreUnavailableError, match="password authentication failed") as refused_login:
        open_job_store(config.job_db_path, postgres_server.url(dbname, password="s3cret-but-wrong"))
    assert "s3cret-but-wrong" not in str(refused_login.value)

    monkeypatch.setenv("DICOM_NODE_JOB_STORE__URL", "mysql://dicom:s3cret-pw@db/jobs")
    with pytest.raises(ConfigError) as refused:
        load_config(config_path)
    assert "job_store" in str(refused.value) and "not a postgresql:// URL" in str(refused.value)
    assert "s3cret-pw" not in str(refused.value)


def test_jobs_migrate_copies_a_sqlite_store_whole(postgres_url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    monkeypatch.delenv("DICOM_NODE_JOB_STORE__URL", raising=False)
    data = tmp_path / "data"
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'data_dir = "{data}"\n')
    source = SqliteJobStore(data / "jobs.sqlite3")
    forgotten = to_dispatching(source, "1.0", study_uid="5.5")  # a gap in the ids, as retention leaves
    source.claim_for_dispatch(D1, lease_s=60)
    source.dispatch_succeeded(forgotten, D1)
    source.mark_files_purged(forgotten, time.time() + 1, "purged")
    source.forget_jobs(time.time() + 1)
    to_dispatching(source, "1.2", study_uid="5.5")  # sent once, failed, waits for its retry
    leased = source.claim_for_dispatch(D1, lease_s=600)
    source.record_delivery(leased.id, D1, "pacs", leased.results[0].sop_instance_uid)
    source.dispatch_failed(leased.id, D1, "pacs down", time.time() + 300)
    sent = to_dispatching(source, "1.3")  # held by a dispatcher's lease
    source.claim_for_dispatch(D1, lease_s=600)
    failed, _ = source.add_received(new_job("1.4"))
    source.claim_for_processing(W1)
    source.fail(failed.id, "cannot decode", owner=W1)
    source.add_received(new_job("1.1"))  # received
    source.add_received(new_job("2.1", kind=JobKind.LESION, source_uid="1.2"))  # runnable: its photo is parsed
    ids = [j.id for j in source.list_jobs(limit=1000)]
    before = {job_id: (source.get(job_id), source.history(job_id)) for job_id in ids}
    listed = source.list_jobs(limit=1000)
    source.close()

    args = build_parser().parse_args(["jobs", "migrate", "--to", postgres_url, "--config", str(config_path)])
    assert jobs_migrate.run(args) == 0
    out = capsys.readouterr().out
    assert f"copied {len(ids)} jobs, 6 results, 1 deliveries" in out

    target = PostgresJobStore(postgres_url)
    try:
        for job_id, (job, history) in before.items():
            assert target.get(job_id) == job
            assert target.history(job_id) == history
        assert target.list_jobs(limit=1000) == listed
        assert target.claim_for_dispatch("m/dispatch-0/", lease_s=60) is None, "the lease and backoff came along"
        assert target.get(sent).owner == D1
        assert target.claim_for_processing(W2).sop_instance_uid == "1.1"
        assert target.claim_for_processing(W2).sop_instance_uid == "2.1", "the lesion query reads the copied rows"
        new, _ = target.add_received(new_job("3.1"))
        assert new.id == max(ids) + 1, "new ids continue after the copied ones"
        assert target.history(new.id)[0].to_state == JobState.RECEIVED
    finally:
        target.close()

    assert jobs_migrate.run(args) == 1, "never into a store that holds jobs"
    assert "already holds jobs" in capsys.readouterr().err
