#!/usr/bin/env python
"""Crash test (issue 12): SIGKILL the whole node at random moments while photos arrive, then check
that every acknowledged photo's results arrived, and arrived once.

* The node: ``python -m dicom_node serve`` in a process group of its own (its workers and
  multiprocessing's helper with it), with an UNTRAINED tiny model made by ``dicom-node model
  make-test --small``, and the eager runtime (``auto`` would spend seconds choosing at every start).
* The sender behaves like a PACS forwarding photos: one new photo every ``--photo-interval-s``,
  each sent (one association, one C-STORE) until the node answers 0x0000 (then it counts as
  acknowledged); a refusal, an aborted association or no answer is retried after ``--retry-pause-s``.
* The destination is a pynetdicom C-STORE SCP in this process; it records what it receives.
* ``--rounds`` times: start the node, wait a random time (``--min-uptime-s`` .. ``--max-uptime-s``:
  during start-up and recovery, intake, parsing, encoding or dispatch), SIGKILL the process group.
  After the last round the node is started once more and left alone until the sender is done and
  every job is final.

Printed at the end: acked (photos answered 0x0000), complete (SEG, SC and SR of the photo at the
destination), missing (acked, not complete), duplicated (results of one photo arrived under more
than one SOP Instance UID of one kind: parsed and sent twice), failed jobs. Exit status 1 when
missing or duplicated is not 0. Takes minutes; not part of the test suite.

Usage: .venv/bin/python scripts/crash_test.py [--rounds 50] [--seed 1] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt  # noqa: E402
from pynetdicom.sop_class import VLPhotographicImageStorage  # type: ignore[attr-defined]  # noqa: E402

from dicom_node.net import status  # noqa: E402
from dicom_node.queue.job import JobState  # noqa: E402
from dicom_node.queue.sqlite_store import SqliteJobStore  # noqa: E402
from tests.node_fixtures import (  # noqa: E402  (the tests' helpers: one copy of each)
    NODE_AET,
    PACS_AET,
    PYTHON,
    SCU_AET,
    free_port,
    node_config,
    to_toml,
    uids_in,
    wait_until,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb  # noqa: E402

KINDS = {"SEG": "SEG", "OT": "SC", "SR": "SR"}  # result Modality -> kind
FINAL = (JobState.DONE, JobState.FAILED)


class Destination:
    """A C-STORE SCP that records, per photo, the SOP Instance UIDs of each kind of result it got."""

    def __init__(self, photos: set[str], lock: threading.Lock) -> None:
        self.photos = photos  # the sender's photo UIDs (shared, under lock)
        self.lock = lock
        self.results: dict[str, dict[str, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
        self.stores = 0
        self.strangers = 0  # objects that reference no photo of ours
        self.ae = AE(ae_title=PACS_AET)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        ds: Dataset = event.dataset
        kind = KINDS.get(str(getattr(ds, "Modality", "")), str(getattr(ds, "Modality", "?")))
        with self.lock:
            self.stores += 1
            referenced = uids_in(ds) & self.photos
            if not referenced:
                self.strangers += 1
            for photo in referenced:
                self.results[photo][kind].add(str(ds.SOPInstanceUID))
        return status.SUCCESS

    def start(self) -> Destination:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class Sender:
    """A PACS forwarding photos to the node: every photo is sent until it is acknowledged (0x0000)."""

    def __init__(self, port: int, photos: set[str], lock: threading.Lock, interval_s: float,
                 retry_pause_s: float) -> None:
        self.port, self.photos, self.lock = port, photos, lock
        self.interval_s, self.retry_pause_s = interval_s, retry_pause_s
        self.acked: list[str] = []
        self.tries = 0
        self.refusals: collections.Counter[str] = collections.Counter()  # why a try did not end in 0x0000
        self._stop = threading.Event()  # no new photos after this; the one in hand is still delivered
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self.ae = AE(ae_title=SCU_AET)
        self.ae.add_requested_context(VLPhotographicImageStorage)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 15

    def start(self) -> Sender:
        self._thread.start()
        return self

    def finish(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise SystemExit(f"the sender could not deliver its last photo in {timeout_s:.0f} s")

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            started = time.monotonic()
            number += 1
            ds = make_vl_photo(synthetic_rgb(64, 96), PatientName="Crash^Test", PatientID=f"CRASH-{number}")
            with self.lock:
                self.photos.add(str(ds.SOPInstanceUID))
            while not self._send(ds):
                time.sleep(self.retry_pause_s)
            self.acked.append(str(ds.SOPInstanceUID))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _send(self, ds: Dataset) -> bool:
        self.tries += 1
        try:
            assoc = self.ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
        except Exception as exc:  # noqa: BLE001  (a sender keeps trying whatever happened)
            self.refusals[type(exc).__name__] += 1
            return False
        if not assoc.is_established:
            self.refusals["association not established"] += 1
            return False
        try:
            answer = assoc.send_c_store(ds)
            code = getattr(answer, "Status", None)
            if code != status.SUCCESS:
                self.refusals["no answer" if code is None else f"status 0x{int(code):04X}"] += 1
            return code == status.SUCCESS
        except Exception as exc:  # noqa: BLE001
            self.refusals[type(exc).__name__] += 1
            return False
        finally:
            assoc.release() if assoc.is_established else assoc.abort()


class Node:
    """``dicom-node serve`` in a process group of its own, killed as a whole."""

    def __init__(self, workdir: Path, config: dict) -> None:
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = workdir / "node.log"
        self.db_path = Path(config["data_dir"]) / "jobs.sqlite3"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.semaphores_removed = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start {self.starts + 1} =====\n")
            log.flush()
            self.process = subprocess.Popen([PYTHON, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                            start_new_session=True)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL every process of the node's group, and wait until they are gone.

        The group's multiprocessing helper dies too, so nothing unlinks the doorbells' named
        semaphores (``/dev/shm/sem.mp-*``): this removes the ones the group had open."""
        assert self.process is not None
        group = self.process.pid
        semaphores = _group_semaphores(group)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_processes(group):
            time.sleep(0.05)
        for semaphore in semaphores | _group_semaphores(group):
            semaphore.unlink(missing_ok=True)
        self.semaphores_removed += len(semaphores)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.process = None
        return code

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def counts(self) -> dict[JobState, int]:
        store = SqliteJobStore(self.db_path)
        try:
            return store.counts()
        finally:
            store.close()

    def jobs(self) -> list:
        store = SqliteJobStore(self.db_path)
        try:
            return store.list_jobs(limit=1_000_000)
        finally:
            store.close()

    def parses(self) -> dict[int, int]:
        """How many times each job was taken for parsing (its history: attempts are not charged for restarts)."""
        store = SqliteJobStore(self.db_path)
        try:
            return {job.id: sum(1 for e in store.history(job.id) if e.to_state == JobState.PARSING)
                    for job in store.list_jobs(limit=1_000_000)}
        finally:
            store.close()


def _group_processes(group: int) -> list[Path]:
    """The /proc entries of the live (not zombie) processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(entry)
    return found


def _group_semaphores(group: int) -> set[Path]:
    """The named POSIX semaphores the processes of a group have mapped."""
    found = set()
    for entry in _group_processes(group):
        try:
            maps = (entry / "maps").read_text()
        except OSError:
            continue
        found.update(Path(line.split()[-1]) for line in maps.splitlines() if "/dev/shm/sem." in line)
    return found


def make_model(directory: Path) -> None:
    done = subprocess.run([PYTHON, "-m", "dicom_node", "model", "make-test", "--dir", str(directory), "--small"],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"model make-test failed:\n{done.stdout}{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="SIGKILLs of the node (default 50)")
    parser.add_argument("--min-uptime-s", type=float, default=0.5)
    parser.add_argument("--max-uptime-s", type=float, default=10.0)
    parser.add_argument("--photo-interval-s", type=float, default=2.0, help="a new photo this often")
    parser.add_argument("--retry-pause-s", type=float, default=0.5, help="the sender's pause after a failed try")
    parser.add_argument("--drain-timeout-s", type=float, default=600.0, help="after the last round")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (node log, job store)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crash_test_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"crash test: {args.rounds} rounds, seed {seed}, work directory {workdir}", flush=True)

    make_model(workdir / "model")
    lock = threading.Lock()
    photos: set[str] = set()
    destination = Destination(photos, lock).start()
    node_port = free_port()
    config = node_config(workdir / "data", workdir / "model", node_port, destination.port,
                         worker={"runtime": "eager", "count": 1, "sweep_interval_s": 5.0},
                         http={"enabled": False})
    node = Node(workdir, config)
    sender = Sender(node_port, photos, lock, args.photo_interval_s, args.retry_pause_s)
    held_at_kill: collections.Counter[str] = collections.Counter()
    keep = True  # unless it ends well: what went wrong is in the node log and the job store
    try:
        node.start()
        sender.start()
        for round_number in range(1, args.rounds + 1):
            uptime = rng.uniform(args.min_uptime_s, args.max_uptime_s)
            time.sleep(uptime)
            if node.exited() is not None:
                raise SystemExit(f"the node exited on its own ({node.exited()}) in round {round_number}; "
                                 f"see {node.log_path}")
            node.kill()
            counts = node.counts()
            for state in (JobState.PARSING, JobState.ENCODING, JobState.DISPATCHING):
                if counts[state]:
                    held_at_kill[state.value] += 1
            print(f"round {round_number}/{args.rounds}: killed after {uptime:.1f} s; acked {len(sender.acked)}; "
                  + ", ".join(f"{s.value} {n}" for s, n in counts.items() if n), flush=True)
            node.start()

        sender.finish(timeout_s=120)
        acked = list(sender.acked)

        def all_final() -> bool:
            if node.exited() is not None:
                raise SystemExit(f"the node exited on its own ({node.exited()}); see {node.log_path}")
            jobs = node.jobs()
            return len(jobs) >= len(set(acked)) and all(j.state in FINAL for j in jobs)

        wait_until(all_final, args.drain_timeout_s, "every job to be done or failed", interval_s=0.5)
        time.sleep(2.0)  # anything sent twice would arrive now
        jobs = node.jobs()
        parses = node.parses()
        node.stop()

        with lock:
            results = {photo: {kind: set(uids) for kind, uids in kinds.items()}
                       for photo, kinds in destination.results.items()}
        complete = [p for p in acked if all(results.get(p, {}).get(k) for k in KINDS.values())]
        missing = [p for p in acked if p not in complete]
        duplicated = [p for p, kinds in results.items() if any(len(uids) > 1 for uids in kinds.values())]
        failed_jobs = [j for j in jobs if j.state == JobState.FAILED]
        unacked_jobs = [j for j in jobs if j.sop_instance_uid not in set(acked)]
        by_uid = {j.sop_instance_uid: j for j in jobs}
        wall_s = time.monotonic() - started

        print("\n===== crash test result =====")
        print(f"rounds: {args.rounds} SIGKILLs of the node's process group (seed {seed}); "
              f"kills with jobs in parsing/encoding/dispatching: {held_at_kill['parsing']}/"
              f"{held_at_kill['encoding']}/{held_at_kill['dispatching']}")
        print(f"sender: {len(acked)} photos acked in {sender.tries} tries; not acked on a try: "
              + (", ".join(f"{why} {n}" for why, n in sender.refusals.most_common()) or "none"))
        print(f"acked:      {len(acked)}")
        print(f"complete:   {len(complete)}")
        print(f"missing:    {len(missing)}")
        print(f"duplicated: {len(duplicated)}")
        print(f"failed jobs: {len(failed_jobs)}")
        distinct = sum(len(uids) for kinds in results.values() for uids in kinds.values())
        print(f"jobs: {len(jobs)} ({len(unacked_jobs)} of photos never acked); parsing began more than once: "
              f"{sum(1 for n in parses.values() if n > 1)}; objects stored at the destination: {destination.stores} "
              f"(re-sent with the same UIDs: {destination.stores - distinct})")
        for photo in missing[:10]:
            job = by_uid.get(photo)
            got = sorted(results.get(photo, {}))
            print(f"  missing {photo}: job {job.id if job else None} {job.state.value if job else 'none'} "
                  f"({job.reason if job else 'no job'}); at the destination: {got}")
        for photo in duplicated[:10]:
            print(f"  duplicated {photo}: " + "; ".join(f"{k} {sorted(u)}" for k, u in results[photo].items()))
        for job in failed_jobs[:10]:
            print(f"  failed job {job.id}: {job.reason}")
        print(f"named semaphores the killed nodes left in /dev/shm (removed): {node.semaphores_removed}")
        print(f"wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min)")
        keep = args.keep or bool(missing or duplicated)
        return 1 if missing or duplicated else 0
    finally:
        if node.process is not None:
            node.kill()
        destination.stop()
        if keep:
            print(f"kept: {workdir} (node log: {node.log_path})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
