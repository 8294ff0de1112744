"""Nodes on the shared PostgreSQL job store (issue 16): work committed by one node rings another's
doorbells (LISTEN/NOTIFY, queue/notify.py), and a node whose PostgreSQL restarts while photos arrive
never acknowledges a photo it could not commit, and carries on without a restart once it is back.

The restart tests run their own PostgreSQL (``restartable_postgres``), not the session's server of
tests/postgres_fixtures.py: stopping that one would pull it from under every other test. It is
started with ``pg_ctl`` (so ``pg_ctl stop``/``start`` can take it down and bring it back on the same
port and data directory) and stopped at the module's end.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom_node.net import status
from dicom_node.queue.doorbell import Doorbells, IdleWait, new_doorbells
from dicom_node.queue.job import JobState, NewJob, ResultKind, ResultObject
from dicom_node.queue.notify import NotifyListener
from dicom_node.queue.postgres_store import PRE_PING_IDLE_S, PostgresJobStore
from tests.node_fixtures import NODE_AET, SCU_AET, StoreSCP, free_port, need_tools, node_config, wait_until
from tests.photo_factory import make_vl_photo, synthetic_rgb

if TYPE_CHECKING:  # imported by pytest as a plugin (below), not here: its asserts are rewritten then
    from tests.postgres_fixtures import PostgresServer

# The session's PostgreSQL server and a database per test (postgres_server, postgres_url).
pytest_plugins = ("tests.postgres_fixtures",)

W1 = "nodeb/worker-0-1/"
RING_WITHIN_S = 2.0  # a notification is delivered on commit: well under a second on one machine


def new_job(uid: str) -> NewJob:
    return NewJob(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                  transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="PACS", calling_host="127.0.0.1",
                  photo_path=f"spool/photos/{uid}.dcm")


def results(job_id: int) -> list[ResultObject]:
    return [ResultObject(kind, "1.2.3", f"9.{job_id}.{n}", "1.2.840.10008.1.2.1", f"spool/results/{job_id}/{kind}.dcm")
            for n, kind in enumerate(ResultKind)]


# ---------------------------------------------------------------------- a PostgreSQL that can be restarted


SERVER_USER = "postgres"  # as in tests/postgres_fixtures.py: PostgreSQL refuses to run as root


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


@dataclass
class RestartablePostgres:
    """A PostgreSQL started by ``pg_ctl``, so that a test can stop it and start it again."""

    server: PostgresServer  # its port, directory and password, and url() / admin()
    bin_dir: Path

    @property
    def root(self) -> Path:
        return self.server.root

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def data(self) -> Path:
        return self.root / "data"

    def pg_ctl(self, *args: str) -> None:
        done = subprocess.run(_as_server_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args]),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}"

    def start(self) -> None:
        # -l: the server's output to a file, not to pg_ctl's (captured) stdout, which would never close
        self.pg_ctl("start", "-w", "-l", str(self.root / "server.log"), "-o",
                    f"-p {self.port} -k {self.root / 'sockets'} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c full_page_writes=off -c max_connections=200")

    def stop(self) -> None:
        """``-m fast``: every open transaction rolled back, every client told "terminating connection"."""
        self.pg_ctl("stop", "-w", "-m", "fast")

    def new_database(self, name: str) -> str:
        with self.server.admin() as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.server.url(name)


@pytest.fixture(scope="module")
def restartable_postgres() -> Iterator[RestartablePostgres]:
    from tests.postgres_fixtures import SERVER_PASSWORD, PostgresServer, postgres_bin_dir

    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").is_file():
        pytest.fail("needs a PostgreSQL server (scripts/setup.sh --test installs Debian's postgresql)", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-restart-"))
    (root / "sockets").mkdir()
    password_file = root / "password"
    password_file.write_text(SERVER_PASSWORD + "\n")
    if os.geteuid() == 0:
        for path in (root, root / "sockets", password_file):
            shutil.chown(path, SERVER_USER, SERVER_USER)
    server = RestartablePostgres(PostgresServer(port=free_port(), root=root), bin_dir)
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(server.data), "-U", SERVER_USER,
                                    "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}",
                                    "-E", "UTF8", "--no-locale", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    try:
        server.start()
        yield server
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(server.data), "stop", "-m", "immediate",
                                        "-w"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- the listener on its own


@dataclass
class TwoNodes:
    """Two nodes on one store: A's store, B's store, B's doorbells and B's listener ringing them."""

    node_a: PostgresJobStore
    node_b: PostgresJobStore
    bells_b: Doorbells
    listener_b: NotifyListener


@pytest.fixture
def two_nodes(postgres_url: str) -> Iterator[TwoNodes]:
    bells = new_doorbells()
    nodes = TwoNodes(PostgresJobStore(postgres_url), PostgresJobStore(postgres_url), bells,
                     NotifyListener(postgres_url, bells))
    nodes.listener_b.start()
    try:
        yield nodes
    finally:
        nodes.listener_b.stop()
        nodes.node_a.close()
        nodes.node_b.close()


def test_a_job_committed_by_one_node_rings_the_other_nodes_bells(two_nodes: TwoNodes) -> None:
    node_a, node_b, listener = two_nodes.node_a, two_nodes.node_b, two_nodes.listener_b
    received, results_ready = two_nodes.bells_b.photo_received, two_nodes.bells_b.results_ready
    assert listener.connected

    job, _ = node_a.add_received(new_job("1.2.3.1"))
    assert received.wait(RING_WITHIN_S), "node A's commit did not ring node B's photo_received bell"
    node_a.add_received(new_job("1.2.3.1"))  # a duplicate commits no job: no ring
    assert not received.wait(0.5)

    claimed = node_b.claim_for_processing(W1)
    assert claimed is not None and claimed.id == job.id
    node_b.advance(job.id, W1, JobState.ENCODING)
    assert not results_ready.wait(0.3), "nothing is ready to dispatch before finish_encoding commits"
    node_b.finish_encoding(job.id, W1, results(job.id), parse_s=1.0)
    assert results_ready.wait(RING_WITHIN_S), "finish_encoding's commit did not ring results_ready"
    assert listener.notifications == 2


def test_an_idle_worker_with_a_long_poll_takes_another_nodes_job_at_once(two_nodes: TwoNodes) -> None:
    """Node B's worker polls every 60 s; node A's commit wakes it (the hand-over, as in worker.py)."""
    node_a, node_b = two_nodes.node_a, two_nodes.node_b
    idle = IdleWait(two_nodes.bells_b.photo_received, poll_s=60.0)
    claimed_at: list[float] = []

    def worker() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if node_b.claim_for_processing(W1) is not None:
                claimed_at.append(time.perf_counter())
                return
            idle.nothing_to_do()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.5)  # idle: drained, looked again, now waiting on its bell for 60 s
    committed_at = time.perf_counter()
    node_a.add_received(new_job("1.2.3.2"))
    thread.join(10)
    assert claimed_at, "node B's worker slept through node A's job"
    assert claimed_at[0] - committed_at < RING_WITHIN_S


def test_the_listener_reconnects_after_postgresql_restarts(
        restartable_postgres: RestartablePostgres, caplog: pytest.LogCaptureFixture) -> None:
    url = restartable_postgres.new_database("listener_restart")
    doorbells = new_doorbells()
    listener = NotifyListener(url, doorbells, reconnect_initial_s=0.1, reconnect_max_s=0.5)
    store = PostgresJobStore(url)
    caplog.set_level(logging.INFO, logger="dicom_node.jobs")
    listener.start()
    try:
        restartable_postgres.stop()
        wait_until(lambda: not listener.connected, 10, "the listener to notice the server went away")
        time.sleep(1.0)  # several failed tries: still one WARNING
        restartable_postgres.start()
        wait_until(lambda: listener.connected, 10, "the listener to reconnect")
        lost = [r for r in caplog.records if "event=job_store.listener_lost" in r.getMessage()]
        back = [r for r in caplog.records if "event=job_store.listener_back" in r.getMessage()]
        assert [r.levelno for r in lost] == [logging.WARNING], "one WARNING per outage"
        assert [r.levelno for r in back] == [logging.INFO]
        assert "job-store-test-pw" not in caplog.text
        doorbells.photo_received.drain()  # the "look now" ring after reconnecting
        # The store's connection broke too; idle longer than PRE_PING_IDLE_S it is checked before use
        # and replaced, so the first call after the outage already lands (no 0xA700 for the sender).
        time.sleep(PRE_PING_IDLE_S + 0.1)
        store.add_received(new_job("1.2.3.3"))
        assert doorbells.photo_received.wait(RING_WITHIN_S), "no ring after the reconnection"
    finally:
        listener.stop()
        store.close()
    assert listener._thread is None  # noqa: SLF001


# ---------------------------------------------------------------------- a node while PostgreSQL restarts


@dataclass
class Sent:
    uid: str
    status: int | None  # None: no response (the association broke)
    at: float


class Sender(threading.Thread):
    """A modality sending photos one after another until told to stop: over one association
    (``per_photo=False``; a new one if it is lost) or a new association per photo."""

    def __init__(self, port: int, per_photo: bool, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.per_photo, self.pause_s = port, per_photo, pause_s
        self.sent: list[Sent] = []
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        ae = AE(ae_title=SCU_AET)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.1.2.1")
        assoc = None
        while not self.halt.is_set():
            photo = make_vl_photo(synthetic_rgb(64, 96))
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
                if not assoc.is_established:
                    self.errors.append("association refused or failed")
                    assoc = None
                    self.halt.wait(self.pause_s)
                    continue
            response = assoc.send_c_store(photo)
            code = int(response.Status) if response and "Status" in response else None
            self.sent.append(Sent(photo.SOPInstanceUID, code, time.monotonic()))
            if self.per_photo:
                assoc.release()
                assoc = None
            self.halt.wait(self.pause_s)
        if assoc is not None and assoc.is_established:
            assoc.release()


def send_photos(port: int, photos: list[Dataset]) -> list[int | None]:
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        out = []
        for photo in photos:
            response = assoc.send_c_store(photo)
            out.append(int(response.Status) if response and "Status" in response else None)
        return out
    finally:
        assoc.release()


def _jobs(url: str) -> Callable[[], list]:
    def read() -> list:
        store = PostgresJobStore(url)
        try:
            return store.list_jobs(limit=10_000)
        finally:
            store.close()
    return read


def test_postgresql_restarted_while_photos_arrive(
        restartable_postgres: RestartablePostgres, node_factory, small_model_dir: Path, tmp_path: Path) -> None:
    """Photos keep coming over a long association and one association per photo while PostgreSQL
    goes down for ~2.5 s: every photo answered success has its job; every other answer is 0xA700
    (out of resources: the sender keeps the photo); once PostgreSQL is back the same node process
    takes and parses new photos, and its listener is connected again."""
    need_tools("storescp", "echoscu")
    url = restartable_postgres.new_database("node_restart")
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        config = node_config(tmp_path / "data", small_model_dir, free_port(), pacs.port,
                             job_store={"url": url}, worker={"count": 1, "runtime": "eager"})
        node = node_factory(config)
        node.start()
        jobs = _jobs(url)

        # ~2 photos/s per sender: enough to hit the outage many times, few enough to parse (1-3 s each)
        senders = [Sender(node.port, per_photo=False, pause_s=0.5), Sender(node.port, per_photo=True, pause_s=0.5)]
        for sender in senders:
            sender.start()
        time.sleep(0.6)
        down_at = time.monotonic()
        restartable_postgres.stop()
        time.sleep(2.5)
        restartable_postgres.start()
        up_at = time.monotonic()
        time.sleep(1.2)
        for sender in senders:
            sender.halt.set()
        for sender in senders:
            sender.join(30)
            assert not sender.is_alive()
        sent = [s for sender in senders for s in sender.sent]

        committed = {job.sop_instance_uid for job in jobs()}
        succeeded = [s for s in sent if s.status is not None and status.is_success(s.status)]
        refused = [s for s in sent if s not in succeeded]
        assert not [s for s in succeeded if s.uid not in committed], "success answered for a photo never committed"
        assert {s.status for s in refused} <= {status.OUT_OF_RESOURCES}, f"statuses: {[s.status for s in refused]}"
        assert refused, "no photo arrived while PostgreSQL was down: the test tested nothing"
        assert all(down_at <= s.at <= up_at + 3 for s in refused), "refused while PostgreSQL was up"
        assert [s for s in succeeded if s.at > up_at], "nothing accepted after PostgreSQL came back"

        # The same node process: new photos are taken, parsed, and their results reach the PACS.
        after = [make_vl_photo(synthetic_rgb(64, 96)) for _ in range(2)]
        assert send_photos(node.port, after) == [status.SUCCESS, status.SUCCESS]
        expected = len(committed) + len(after)

        def all_done() -> bool:
            found = jobs()
            return len(found) == expected and all(job.state == JobState.DONE for job in found)

        wait_until(all_done, 90, f"{expected} jobs parsed and dispatched (node log: {node.log_path})", interval_s=0.5)
        assert len(pacs.files()) == 3 * expected, "a SEG, an SC and an SR per committed photo, each once"
        log_text = node.log_text()
        assert log_text.count("event=job_store.listener_lost") == 1, log_text[-3000:]
        assert "event=job_store.listener_back" in log_text
        assert node.process is not None and node.process.poll() is None, "the node kept running"
    finally:
        pacs.stop()
