#!/usr/bin/env python
"""Benchmark the node's intake against dcmtk's storescp, and its end-to-end overhead with Orthanc.

1. Intake rate: photos acknowledged per second, ~1 MB uncompressed VL photos sent by dcmtk's
   storescu over one association and over 4 parallel associations, to
   (a) ``dicom-node serve`` with ``worker.count = 0`` (intake only: spool + fsync + job commit), and
   (b) dcmtk's ``storescp`` writing the same files to disk (no fsync, no database).
   Target: node >= 0.5 x storescp.
2. End-to-end: a 12 MP photo C-STOREd to the node until its SEG, SC and SR are stored in Orthanc
   (polled over REST), minus the parse time the node records (``parse_s``). Target <= 0.5 s.
   The breakdown comes from the node's ``worker.timings`` and ``dispatch.sent`` log lines.
3. With ``--job-store URL`` (or ``--start-postgres``): 1 and 2 with the node's job store on SQLite
   (the default) and on PostgreSQL in the same run, side by side with their ratio (issue 16), and
   the cross-node hand-over: the time from a job's commit by one node to its claim by another
   node's idle worker (polling every 0.1 s, the default), with and without LISTEN/NOTIFY
   (``dicom_node/queue/notify.py``). Every node run gets a new, empty database of the URL's server
   (``CREATE DATABASE``, dropped afterwards: the URL's user needs CREATEDB), as every SQLite run a
   new file.

Usage: .venv/bin/python scripts/bench_node.py [--photos 100] [--e2e-photos 3] [--model-dir DIR]
       [--job-store postgresql://user:pw@host:5432/db | --start-postgres]
Needs dcmtk and orthanc (Debian packages); --start-postgres needs Debian's postgresql (a temporary
server: initdb in a temporary directory, as the postgres user when run as root, on a free port).
With no --model-dir, an UNTRAINED small model is made in a temporary directory (parse times are then
not those of the real model; the overhead is).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.node_fixtures import (  # noqa: E402  (the tests' process helpers: one copy of each)
    SCU_AET,
    NodeProcess,
    Orthanc,
    StoreSCP,
    free_port,
    node_config,
    wait_until,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb, write_dataset  # noqa: E402

PARALLEL = 4
SIDE_1MB = 578  # 578 x 578 x 3 bytes = 1.0 MB of pixel data
# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; then every object
# waits for a delayed ACK (~40 ms) and storescp tops out near 20 photos/s. Both settings are measured
# (for the sender and for storescp); the node always turns Nagle off on its own sockets.
DCMTK_SETTINGS = {"dcmtk default": "0", "TCP_NODELAY=1": "1"}
SQLITE, POSTGRES = "sqlite", "postgresql"
HANDOVER_POLL_S = 0.1  # worker.poll_interval_s's default


# --------------------------------------------------------------------------- job stores


class JobStores:
    """Where a node run keeps its jobs: a new SQLite file (the default), or a new database of the
    PostgreSQL server at ``url``, made for the run and dropped after it."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._numbers = itertools.count(1)

    @property
    def engines(self) -> tuple[str, ...]:
        return (SQLITE, POSTGRES) if self.url else (SQLITE,)

    @contextmanager
    def database(self, engine: str) -> Iterator[str | None]:
        """``[job_store] url`` for one node run: None (SQLite in the data directory) or a new database."""
        if engine == SQLITE:
            yield None
            return
        import psycopg

        assert self.url is not None
        name = f"dicom_node_bench_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        try:
            yield _with_dbname(self.url, name)
        finally:
            with psycopg.connect(self.url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def jobs(self, node: NodeProcess, url: str | None) -> list[Any]:
        if url is None:
            return node.jobs()
        from dicom_node.queue.postgres_store import PostgresJobStore

        store = PostgresJobStore(url)
        try:
            return store.list_jobs(limit=100_000)
        finally:
            store.close()


def _with_dbname(url: str, dbname: str) -> str:
    """``url`` (postgresql://user:pw@host:port/db?query) naming another database."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts._replace(path="/" + dbname).geturl()


@contextmanager
def temporary_postgres(work: Path) -> Iterator[str]:
    """A PostgreSQL server for the run, as the tests start one (tests/postgres_fixtures.py): initdb in
    ``work``, the server as the postgres user when run as root, on a free port; stopped at the end.
    Its settings are the tests' (fsync off), so its figures are an upper bound for a real server."""
    from tests.postgres_fixtures import SERVER_PASSWORD, SERVER_USER, postgres_bin_dir

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise SystemExit("--start-postgres needs Debian's postgresql (scripts/setup.sh --test installs it)")

    def as_server_user(command: list[str]) -> list[str]:
        return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command

    root = Path(tempfile.mkdtemp(prefix="bench-pg-", dir=work))
    data, sockets, password_file = root / "data", root / "sockets", root / "password"
    sockets.mkdir()
    password_file.write_text(SERVER_PASSWORD + "\n")
    if os.geteuid() == 0:
        for path in (work, root, sockets, password_file):
            shutil.chown(path, SERVER_USER, SERVER_USER)
    port = free_port()
    subprocess.run(as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", SERVER_USER, "--auth-local=trust",
                                   "--auth-host=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8",
                                   "--no-locale", "--no-sync"]), check=True, capture_output=True, timeout=120)
    subprocess.run(as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "start", "-w", "-l",
                                   str(root / "server.log"), "-o",
                                   f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                                   "-c full_page_writes=off -c max_connections=200"]),
                   check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql://{SERVER_USER}:{SERVER_PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "stop", "-m", "fast", "-w"]),
                       capture_output=True, timeout=60)


# --------------------------------------------------------------------------- intake


def make_photos(directory: Path, count: int, rows: int, columns: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rgb = synthetic_rgb(rows, columns)
    return [write_dataset(make_vl_photo(rgb), directory / f"p{i:04d}.dcm") for i in range(count)]


def send(files: list[Path], port: int, called: str, parallel: int) -> float:
    """Seconds until every storescu (one association each) has finished; raises if any failed."""
    groups = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    processes = [subprocess.Popen(["storescu", "-aet", SCU_AET, "-aec", called, "127.0.0.1", str(port),
                                   *map(str, group)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for group in groups]
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.strip()[:500]}")
    return time.perf_counter() - started


def receivers(stores: JobStores) -> list[str]:
    return ["storescp", *(f"dicom-node {engine}" for engine in stores.engines)]


def bench_intake(work: Path, count: int, model_dir: Path, repeat: int,
                 stores: JobStores) -> dict[tuple[str, str, int], float]:
    """Best-of-``repeat`` rates (photos/s) by (dcmtk setting, receiver, associations); fresh UIDs every run."""
    rates: dict[tuple[str, str, int], float] = {}
    run = 0
    for setting, nodelay in DCMTK_SETTINGS.items():
        os.environ["TCP_NODELAY"] = nodelay
        for parallel in (1, PARALLEL):
            for _ in range(repeat):
                run += 1
                files = make_photos(work / f"photos_{run}", count, SIDE_1MB, SIDE_1MB)
                scp = StoreSCP(work / f"storescp_{run}", fork=parallel > 1).start()
                try:
                    rate = count / send(files, scp.port, scp.aet, parallel)
                finally:
                    scp.stop()
                key = (setting, "storescp", parallel)
                rates[key] = max(rates.get(key, 0.0), rate)

                for engine in stores.engines:
                    with stores.database(engine) as url:
                        name = f"node_{run}_{engine}"
                        config = node_config(work / name / "data", model_dir, free_port(), 9,
                                             worker={"count": 0}, intake={"max_associations": 16},
                                             **({"job_store": {"url": url}} if url else {}))
                        node = NodeProcess(work / name, config).start(wait_ready=False)
                        try:
                            node.wait_listening()
                            rate = count / send(files, node.port, "DICOM_NODE", parallel)
                            committed = len(stores.jobs(node, url))
                            assert committed == count, f"{committed} jobs for {count} photos"
                        finally:
                            node.stop()
                    key = (setting, f"dicom-node {engine}", parallel)
                    rates[key] = max(rates.get(key, 0.0), rate)
                for path in files:
                    path.unlink()
    os.environ["TCP_NODELAY"] = "1"
    return rates


# --------------------------------------------------------------------------- end to end


_TIMINGS = re.compile(r"event=worker\.timings job=(\d+) decode_s=([\d.]+) parse_s=([\d.]+) encode_s=([\d.]+) "
                      r"write_s=([\d.]+)")
_SENT = re.compile(r"event=dispatch\.sent job=(\d+) destination=\S+ objects=\d+ seconds=([\d.]+)")


def bench_end_to_end(work: Path, photos: int, model_dir: Path, sc_jpeg: bool, stores: JobStores,
                     engine: str, runtime: str) -> list[dict[str, float]]:
    node_port = free_port()
    name = f"{engine}_{int(sc_jpeg)}"
    orthanc = Orthanc(work / f"orthanc_{name}", node_port).start()
    rows = []
    with stores.database(engine) as url:
        config = node_config(work / f"e2e_{name}" / "data", model_dir, node_port, orthanc.dicom_port,
                             results={"sc_jpeg": sc_jpeg},
                             # the default polls: the stages hand over by doorbell (queue/doorbell.py), not by poll
                             worker={"poll_interval_s": 0.1, "runtime": runtime}, dispatch={"poll_interval_s": 0.1},
                             **({"job_store": {"url": url}} if url else {}))
        node = NodeProcess(work / f"e2e_{name}", config).start(timeout_s=600)  # "auto" measures runtimes first
        try:
            files = make_photos(work / f"photos_12mp_{name}", photos, 3000, 4000)
            for path in files:
                import pydicom

                ds = pydicom.dcmread(path, stop_before_pixels=True)
                started = time.perf_counter()
                send([path], node.port, "DICOM_NODE", 1)
                acknowledged = time.perf_counter() - started
                study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
                wait_until(partial(_results_stored, orthanc, study_uid), 600, "results in Orthanc", interval_s=0.02)
                total = time.perf_counter() - started
                job = wait_until(partial(_done_job, stores, node, url, sop_uid), 60, "the job to be done")
                log = node.log_text()
                timing = next(m for m in _TIMINGS.finditer(log) if int(m.group(1)) == job.id)
                sent = next(m for m in _SENT.finditer(log) if int(m.group(1)) == job.id)
                rows.append({
                    "end_to_end_s": total,
                    "parse_s": job.parse_s,
                    "overhead_s": total - job.parse_s,
                    "intake_s": acknowledged,
                    "decode_s": float(timing.group(2)),
                    "encode_s": float(timing.group(4)),
                    "write_s": float(timing.group(5)),
                    "dispatch_s": float(sent.group(2)),
                })
        finally:
            node.stop()
            orthanc.stop()
    return rows


def _results_stored(orthanc: Orthanc, study_uid: str) -> bool:
    return len(orthanc.study_instances(study_uid)) >= 3  # SEG, SC, SR


def _done_job(stores: JobStores, node: NodeProcess, url: str | None, sop_uid: str) -> Any:
    return next((j for j in stores.jobs(node, url) if j.sop_instance_uid == sop_uid and j.state.value == "done"),
                None)


# --------------------------------------------------------------------------- cross-node hand-over


def bench_handover(stores: JobStores, jobs: int) -> dict[str, list[float]]:
    """Seconds from node A's commit of a job to its claim by node B's idle worker (an IdleWait on B's
    photo_received bell polling every HANDOVER_POLL_S, as worker.py waits), without and with B's
    NotifyListener. A and B are two stores (connections) on one database, in this process."""
    from dicom_node.queue.doorbell import IdleWait, new_doorbells
    from dicom_node.queue.job import NewJob
    from dicom_node.queue.notify import NotifyListener
    from dicom_node.queue.postgres_store import PostgresJobStore

    out: dict[str, list[float]] = {}
    for label, listen in (("polling only", False), ("LISTEN/NOTIFY", True)):
        with stores.database(POSTGRES) as url:
            assert url is not None
            node_a, node_b = PostgresJobStore(url), PostgresJobStore(url)
            bells = new_doorbells()
            listener = NotifyListener(url, bells) if listen else None
            if listener is not None:
                listener.start()
            committed: dict[str, float] = {}  # by SOP Instance UID: a claim may come before add_received returns
            latencies: list[float] = []
            done = threading.Event()

            def worker(node_b: PostgresJobStore = node_b, bells: Any = bells, committed: dict[str, float] = committed,
                       latencies: list[float] = latencies, done: threading.Event = done) -> None:
                idle = IdleWait(bells.photo_received, HANDOVER_POLL_S)
                while not done.is_set():
                    job = node_b.claim_for_processing("nodeb/worker-0-1/")
                    if job is None:
                        idle.nothing_to_do()
                        continue
                    idle.found_work()
                    latencies.append(time.perf_counter() - committed[job.sop_instance_uid])

            thread = threading.Thread(target=worker, daemon=True)
            thread.start()
            rng = random.Random(16)
            try:
                for n in range(jobs):
                    time.sleep(rng.uniform(0.05, 0.25))  # arrivals out of step with B's polls
                    uid = f"2.25.{os.getpid()}{n:06d}"
                    new = NewJob(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="BENCH",
                                 calling_host="127.0.0.1", photo_path=f"spool/photos/{uid}.dcm")
                    # from before the commit's round trip: what a photo's sender waits for as well
                    committed[uid] = time.perf_counter()
                    node_a.add_received(new)
                wait_until(lambda: len(latencies) >= jobs, 30, "every job claimed", interval_s=0.05)  # noqa: B023
            finally:
                done.set()
                bells.photo_received.ring()
                thread.join(5)
                if listener is not None:
                    listener.stop()
                node_a.close()
                node_b.close()
            out[label] = latencies
    return out


# --------------------------------------------------------------------------- main


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100, help="1 MB photos per intake run (default %(default)s)")
    parser.add_argument("--e2e-photos", type=int, default=3, help="12 MP photos end to end (default %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: a small UNTRAINED test model")
    parser.add_argument("--repeat", type=int, default=2, help="intake runs per figure, best kept (default %(default)s)")
    parser.add_argument("--skip-intake", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--job-store", metavar="URL", default=None,
                        help="also run every node on this PostgreSQL server (a new database per run; CREATEDB needed)")
    parser.add_argument("--start-postgres", action="store_true",
                        help="with no --job-store: start a temporary PostgreSQL server for the run")
    parser.add_argument("--runtime", default="eager",
                        help="the end-to-end node's worker.runtime (default %(default)s: the overhead, not the "
                             "parse, is measured, and 'auto' first spends minutes choosing)")
    parser.add_argument("--handover-jobs", type=int, default=50,
                        help="jobs in the cross-node hand-over measurement (PostgreSQL only; default %(default)s)")
    args = parser.parse_args()

    if args.job_store is not None and not args.job_store.startswith(("postgresql://", "postgres://")):
        parser.error("--job-store takes a postgresql://user:password@host:port/dbname URL")
    with tempfile.TemporaryDirectory(prefix="bench_node_") as tmp:
        work = Path(tmp)
        with ExitStack() as stack:
            url = args.job_store
            if url is None and args.start_postgres:
                url = stack.enter_context(temporary_postgres(work))
                print("job store: SQLite and a temporary PostgreSQL (fsync off, as in the tests)")
            elif url is not None:
                from dicom_node.config import mask_url

                print(f"job store: SQLite and {mask_url(url)}")
            stores = JobStores(url)
            run(args, work, stores)
    return 0


def run(args: argparse.Namespace, work: Path, stores: JobStores) -> None:
    model_dir = args.model_dir
    if model_dir is None:
        from dicom_node.model.untrained import make_test_model_dir

        model_dir = make_test_model_dir(work / "model", small=True)
        print(f"model: small UNTRAINED test model ({model_dir})")
    else:
        print(f"model: {model_dir}")

    if stores.url and args.handover_jobs:
        latencies = bench_handover(stores, args.handover_jobs)
        print(f"\nCross-node hand-over: node A commits a job, node B's idle worker (polling every "
              f"{HANDOVER_POLL_S:g} s) claims it; {args.handover_jobs} jobs, seconds from commit to claim")
        print(f"{'':<16} {'median':>8} {'p95':>8} {'max':>8}")
        for label, values in latencies.items():
            ordered = sorted(values)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            print(f"{label:<16} {statistics.median(ordered):>8.4f} {p95:>8.4f} {ordered[-1]:>8.4f}")

    if not args.skip_intake:
        rates = bench_intake(work, args.photos, model_dir, args.repeat, stores)
        print(f"\nIntake: {args.photos} photos of {SIDE_1MB * SIDE_1MB * 3 / 1e6:.1f} MB each, dcmtk storescu as "
              f"sender, photos acknowledged per second (best of {args.repeat})")
        print(f"{'dcmtk setting':<15} {'receiver':<22} {'1 association':>14} {f'{PARALLEL} parallel':>12}")
        for setting in DCMTK_SETTINGS:
            for receiver in receivers(stores):
                print(f"{setting:<15} {receiver:<22} {rates[(setting, receiver, 1)]:>14.1f} "
                      f"{rates[(setting, receiver, PARALLEL)]:>12.1f}")
            for engine in stores.engines:
                ratios = [_ratio(rates[(setting, f"dicom-node {engine}", n)], rates[(setting, "storescp", n)])
                          for n in (1, PARALLEL)]
                print(f"{setting:<15} {f'{engine}/storescp':<22} {ratios[0]:>14} {ratios[1]:>12}   (target >= 0.5)")
            if POSTGRES in stores.engines:
                ratios = [_ratio(rates[(setting, "dicom-node postgresql", n)], rates[(setting, "dicom-node sqlite", n)])
                          for n in (1, PARALLEL)]
                print(f"{setting:<15} {'postgresql/sqlite':<22} {ratios[0]:>14} {ratios[1]:>12}")

    if not args.skip_e2e:
        keys = ("end_to_end_s", "parse_s", "overhead_s", "intake_s", "decode_s", "encode_s", "write_s", "dispatch_s")
        for sc_jpeg in (False, True):
            medians: dict[str, dict[str, float]] = {}
            for engine in stores.engines:
                rows = bench_end_to_end(work, args.e2e_photos, model_dir, sc_jpeg, stores, engine, args.runtime)
                medians[engine] = {key: statistics.median(r[key] for r in rows) for key in keys}
            label = "JPEG" if sc_jpeg else "uncompressed"
            print(f"\nEnd to end: 12 MP (4000x3000) uncompressed photo -> node -> SEG+SC+SR in Orthanc "
                  f"(SC {label}), median of {args.e2e_photos}")
            print(f"  {'':<14} " + " ".join(f"{engine:>10}" for engine in stores.engines)
                  + (f" {'pg/sqlite':>10}" if POSTGRES in stores.engines else ""))
            for key in keys:
                line = f"  {key:<14} " + " ".join(f"{medians[engine][key]:>10.3f}" for engine in stores.engines)
                if POSTGRES in stores.engines:
                    line += f" {_ratio(medians[POSTGRES][key], medians[SQLITE][key]):>10}"
                print(line)
            print("  overhead = end to end - parse (target <= 0.5 s); intake/decode/encode/write/dispatch are "
                  "its parts, plus polling")


if __name__ == "__main__":
    sys.exit(main())
