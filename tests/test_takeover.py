"""Several nodes on one queue (issue 16): two real node processes share one PostgreSQL job store and
one spool directory, Orthanc is the PACS, dcmtk's storescu the modality.

* a node with no worker (``worker.count = 0``) receives; the other node's worker parses, and its
  dispatcher sends SEG, SC and SR to Orthanc; ``jobs list`` on either node shows the same jobs;
* one of two nodes is SIGKILLed (its whole process group, workers included) while it parses: once
  its processing leases run out (``worker.lease_s`` = 3 s here) the other node takes its jobs over,
  and every photo's three results reach Orthanc once, with the SOP Instance UIDs the job store
  recorded (no missing object, no second result of one photo).

Each node is a ``dicom-node serve`` process; the tiny untrained model and the eager runtime keep a
parse well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dicom_node.pipeline.processor import LeaseRenewal
from dicom_node.queue.job import PROCESSING_STATES, Job, JobState, NewJob
from dicom_node.queue.postgres_store import PostgresJobStore
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import (
    REPO,
    NodeProcess,
    Orthanc,
    free_port,
    node_config,
    storescu,
    wait_until,
    write_photos,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

pytest_plugins = ("tests.postgres_fixtures",)

LEASE_S = 3.0
FINAL = (JobState.DONE, JobState.FAILED)


def group_config(name: str, tmp_path: Path, model_dir: Path, orthanc: Orthanc, url: str, workers: int) -> dict:
    """One node of the group: its own node_id, port and data directory; the shared store and spool."""
    return node_config(
        tmp_path / name / "data", model_dir, free_port(), orthanc.dicom_port,
        node_id=name,
        spool_dir=str(tmp_path / "shared-spool"),
        job_store={"url": url},
        worker={"count": workers, "runtime": "eager", "torch_threads": 1, "lease_s": LEASE_S},
        dispatch={"lease_s": LEASE_S},
    )


def start_all(*nodes: NodeProcess) -> None:
    """Start the nodes together (each loads Python and the model on its own), then wait for each to listen."""
    for node in nodes:
        node.start(wait_ready=False, own_process_group=True)
    for node in nodes:
        node.wait_listening()


def kill_group(node: NodeProcess) -> None:
    """SIGKILL the node and its workers at once: a machine that dies."""
    assert node.process is not None
    os.killpg(node.process.pid, signal.SIGKILL)
    node.process.wait(timeout=10)
    node.process = None


def wait_all_final(store: PostgresJobStore, count: int, timeout_s: float, *nodes: NodeProcess) -> list[Job]:
    def final() -> list[Job] | None:
        jobs = store.list_jobs(limit=1000)
        if len(jobs) >= count and all(j.state in FINAL for j in jobs):
            return jobs
        return None

    try:
        return wait_until(final, timeout_s, f"{count} jobs to end", interval_s=0.2)
    except AssertionError:
        for node in nodes:
            print(f"--- {node.log_path}\n{node.log_text()[-4000:]}")
        raise


def jobs_list(config_path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "dicom_node", "jobs", "list", "--json", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def results_in_orthanc(orthanc: Orthanc, photo: Dataset) -> list[str]:
    """SOP Instance UIDs of every object Orthanc holds in the photo's study (the photo is not sent there)."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(photo.StudyInstanceUID)]


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresJobStore]:
    opened = PostgresJobStore(postgres_url)
    yield opened
    opened.close()


# --------------------------------------------------------------------------- one receives, the other parses


def test_a_node_without_workers_receives_and_the_other_node_parses(
        running_orthanc: Orthanc, node_factory: Callable[..., NodeProcess], small_model_dir: Path,
        postgres_url: str, store: PostgresJobStore, tmp_path: Path) -> None:
    receiver = node_factory(group_config("node-a", tmp_path, small_model_dir, running_orthanc, postgres_url, 0),
                            "node-a")
    parser = node_factory(group_config("node-b", tmp_path, small_model_dir, running_orthanc, postgres_url, 1),
                          "node-b")
    start_all(receiver, parser)
    parser.wait_ready()
    photo = make_vl_photo(synthetic_rgb(64, 96))
    sent = storescu(write_photos([photo], tmp_path / "in"), receiver.port)
    assert sent.returncode == 0, sent.stderr

    (job,) = wait_all_final(store, 1, 60, receiver, parser)
    assert job.state == JobState.DONE, job.reason
    assert (tmp_path / "shared-spool" / job.photo_path.removeprefix("spool/")).is_file(), "the shared spool holds it"
    assert not (tmp_path / "node-a" / "data" / "spool" / "photos").exists() or not any(
        (tmp_path / "node-a" / "data" / "spool" / "photos").rglob("*.dcm")), "nothing in the receiver's data_dir"
    assert f"event=worker.timings job={job.id} " in parser.log_text(), "node-b's worker parsed it"
    assert "event=worker.timings" not in receiver.log_text()
    recorded = {r.sop_instance_uid for r in job.results}
    assert [r.kind for r in job.results] == ["seg", "sc", "sr"]
    wait_until(lambda: set(results_in_orthanc(running_orthanc, photo)) == recorded, 20, "SEG, SC and SR in Orthanc")

    on_a, on_b = jobs_list(receiver.config_path), jobs_list(parser.config_path)
    assert on_a["counts"] == on_b["counts"] and on_a["counts"]["done"] == 1
    assert [(j["id"], j["state"], j["sop_instance_uid"]) for j in on_a["jobs"]] == \
        [(j["id"], j["state"], j["sop_instance_uid"]) for j in on_b["jobs"]] == \
        [(job.id, "done", photo.SOPInstanceUID)]


# --------------------------------------------------------------------------- a node dies mid-parse


def test_a_killed_nodes_jobs_are_taken_over_and_every_result_arrives_once(
        running_orthanc: Orthanc, node_factory: Callable[..., NodeProcess], small_model_dir: Path,
        postgres_url: str, store: PostgresJobStore, tmp_path: Path) -> None:
    victim = node_factory(group_config("node-a", tmp_path, small_model_dir, running_orthanc, postgres_url, 1),
                          "node-a")
    survivor = node_factory(group_config("node-b", tmp_path, small_model_dir, running_orthanc, postgres_url, 1),
                            "node-b")
    start_all(victim, survivor)
    victim.wait_ready()
    survivor.wait_ready()
    photos = [make_vl_photo(synthetic_rgb(240, 320)) for _ in range(20)]
    batches = {victim.port: write_photos(photos[:10], tmp_path / "in-a"),
               survivor.port: write_photos(photos[10:], tmp_path / "in-b")}
    outcomes: dict[int, subprocess.CompletedProcess] = {}

    def send(port: int) -> None:
        outcomes[port] = storescu(batches[port], port)

    senders = [threading.Thread(target=send, args=(port,)) for port in batches]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(timeout=90)
    assert all(outcomes[port].returncode == 0 for port in batches), {p: o.stderr for p, o in outcomes.items()}
    assert len(store.list_jobs(limit=100)) == 20, "every photo acknowledged is a committed job"

    def victim_parsing() -> Job | None:
        held = [j for j in store.held_jobs("node-a/") if j.state in PROCESSING_STATES]
        return held[0] if held else None

    held = wait_until(victim_parsing, 30, "node-a to hold a job it is parsing", interval_s=0.01)
    kill_group(victim)
    killed_at = time.monotonic()

    jobs = wait_all_final(store, 20, 90, survivor)
    assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.state, j.reason) for j in jobs if j.state != "done"]
    taken_over = [j for j in jobs if any(f"lease of {held.owner} expired (node presumed dead); taken over by node-b/"
                                         in (e.reason or "") for e in store.history(j.id))]
    assert held.id in {j.id for j in taken_over}, store.history(held.id)
    assert time.monotonic() - killed_at >= LEASE_S - 1.0, "taken over only once its lease ran out"

    by_uid = {j.sop_instance_uid: j for j in jobs}
    for photo in photos:
        job = by_uid[photo.SOPInstanceUID]
        recorded = sorted(r.sop_instance_uid for r in job.results)
        assert len(recorded) == 3

        def arrived(photo: Dataset = photo, recorded: list[str] = recorded) -> list[str] | None:
            found = sorted(results_in_orthanc(running_orthanc, photo))
            return found if found == recorded else None

        in_orthanc = wait_until(arrived, 20, f"job {job.id}'s results in Orthanc")
        assert in_orthanc == recorded, "each result once, with the SOP Instance UID the job store recorded"


# --------------------------------------------------------------------------- the pieces, without processes


def test_a_lease_renewed_while_a_job_is_in_hand_keeps_it_and_stops_when_taken(tmp_path: Path) -> None:
    """LeaseRenewal (the worker's) keeps a job three leases long; a refused renewal marks it lost."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        job, _ = store.add_received(NewJob("1.2.3", "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.1.2.1", "MOD",
                                           "127.0.0.1", "spool/photos/x.dcm"))
        store.claim_for_processing("a/worker-0-1/", lease_s=0.4)
        with LeaseRenewal(store, job.id, "a/worker-0-1/", 0.4) as renewal:
            for _ in range(6):
                time.sleep(0.2)
                assert store.claim_for_processing("b/worker-0-1/", lease_s=0.4) is None
            assert not renewal.lost.is_set()
        time.sleep(0.5)
        taken = store.claim_for_processing("b/worker-0-1/", lease_s=60)
        assert taken is not None and taken.owner == "b/worker-0-1/"
        with LeaseRenewal(store, job.id, "a/worker-0-1/", 0.4) as renewal:
            assert renewal.lost.wait(2), "the stale holder's renewal is refused"
    finally:
        store.close()


def test_the_spool_resolves_records_under_spool_dir_and_spares_other_nodes_writes(tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "spool"
    one, other = LocalSpool(tmp_path / "a", shared), LocalSpool(tmp_path / "b", shared)
    one.prepare()
    relative = one.write_photo(b"photo")
    assert relative.startswith("spool/photos/") and other.path(relative).read_bytes() == b"photo"
    assert LocalSpool(tmp_path / "a").path("spool/photos/x.dcm") == tmp_path / "a" / "spool" / "photos" / "x.dcm"
    ds = make_vl_photo(synthetic_rgb(32, 48))
    first, second = one.write_result(7, "sc", ds, attempt=1), other.write_result(7, "sc", ds, attempt=2)
    assert (first, second) == ("spool/results/7/sc-1.dcm", "spool/results/7/sc-2.dcm"), "one name per attempt"
    in_flight = shared / "photos" / ".tmp-another-nodes-write.dcm.1234"
    in_flight.write_bytes(b"half")
    crashed = shared / "results" / ".tmp-left-by-a-crash.dcm.5678"
    crashed.write_bytes(b"old")
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    other.prepare()  # a node starting: a crash's leftovers go, another node's write in progress stays
    assert in_flight.exists() and not crashed.exists()
    assert one.delete_job_files(7, relative, [first]).files == 3, "the photo and both attempts' results"
