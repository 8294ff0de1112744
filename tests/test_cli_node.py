"""The node's command line: `send` and `echo` against dcmtk's storescp, `jobs list|show|retry` on a job store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.queue.job import JobState, NewJob, ResultObject
from dicom_node.queue.sqlite_store import SqliteJobStore
from tests.node_fixtures import REPO, StoreSCP, free_port, need_tools, to_toml, write_photos
from tests.photo_factory import make_vl_photo, synthetic_rgb


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


@pytest.fixture
def pacs(tmp_path: Path):
    need_tools("storescp")
    server = StoreSCP(tmp_path / "pacs").start()
    yield server
    server.stop()


def write_config(tmp_path: Path, pacs_port: int) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(to_toml({
        "data_dir": str(tmp_path / "data"),
        "callers": [{"ae_title": "MOD", "return_to": "pacs"}],
        "destinations": [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}],
    }))
    return path


def test_send_stores_files_and_reports_each(pacs: StoreSCP, tmp_path: Path) -> None:
    photos = [make_vl_photo(synthetic_rgb(32, 48)) for _ in range(2)]
    write_photos(photos, tmp_path / "in")
    done = cli("send", str(tmp_path / "in"), "--to", f"127.0.0.1:{pacs.port}", "--aet", "STORESCP")
    assert done.returncode == 0, done.stderr
    assert "sent 2 of 2" in done.stdout and done.stdout.count("0x0000 (success)") == 2
    assert {pydicom.dcmread(p).SOPInstanceUID for p in pacs.files()} == {p.SOPInstanceUID for p in photos}


def test_send_to_nobody_fails_cleanly(tmp_path: Path) -> None:
    path = write_photos([make_vl_photo(synthetic_rgb(32, 48))], tmp_path)[0]
    done = cli("send", str(path), "--to", f"127.0.0.1:{free_port()}", "--aet", "X")
    assert done.returncode == 1 and "cannot connect" in done.stderr and "Traceback" not in done.stderr
    assert "connection refused (nothing listens on that port)" in done.stderr, done.stderr
    assert cli("send", str(path), "--to", "nohostport", "--aet", "X").returncode == 2


def test_echo_by_destination_name_and_by_address(pacs: StoreSCP, tmp_path: Path) -> None:
    config = write_config(tmp_path, pacs.port)
    by_name = cli("echo", "pacs", "--config", str(config))
    assert by_name.returncode == 0 and "C-ECHO to pacs (STORESCP@127.0.0.1" in by_name.stdout
    assert "0x0000 (success)" in by_name.stdout
    by_address = cli("echo", f"127.0.0.1:{pacs.port}", "--aet", "STORESCP", "--config", str(config))
    assert by_address.returncode == 0
    unknown = cli("echo", "archive", "--config", str(config))
    assert unknown.returncode == 2 and "neither a destination name (pacs)" in unknown.stderr
    down = cli("echo", f"127.0.0.1:{free_port()}", "--config", str(config))
    assert down.returncode == 1 and "cannot connect" in down.stderr


def test_jobs_list_show_and_retry(tmp_path: Path) -> None:
    config = write_config(tmp_path, 104)
    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3")
    owner = "n/worker-0-1/"
    ids = []
    for uid in ("1.2.3.1", "1.2.3.2"):
        job, _ = store.add_received(NewJob(uid, "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.1.2.1", "MOD",
                                           "127.0.0.1", f"spool/photos/{uid}.dcm"))
        ids.append(job.id)
    store.claim_for_processing(owner)
    store.fail(ids[0], "cannot decode the photo: pixel data truncated", owner=owner)
    store.claim_for_processing(owner)
    store.set_route(ids[1], owner, "photos", ["pacs"])
    store.advance(ids[1], owner, JobState.ENCODING)
    store.finish_encoding(ids[1], owner, [ResultObject("sc", "1.2.840.10008.5.1.4.1.1.7", "9.9.9",
                                                       "1.2.840.10008.1.2.1", "spool/results/2/sc.dcm")], 2.5)
    claimed = store.claim_for_dispatch("n/dispatch-0/", 60)
    store.dispatch_failed(claimed.id, "n/dispatch-0/", "gave up after 10 dispatch attempts", None)
    store.close()

    listed = cli("jobs", "list", "--config", str(config))
    assert listed.returncode == 0
    assert "pixel data truncated" in listed.stdout and "failed: 2" in listed.stdout
    as_json = json.loads(cli("jobs", "list", "--json", "--config", str(config)).stdout)
    assert as_json["counts"]["failed"] == 2 and len(as_json["jobs"]) == 2

    shown = cli("jobs", "show", str(ids[1]), "--config", str(config))
    assert shown.returncode == 0
    assert "result sc     9.9.9 -> delivered to nobody yet" in shown.stdout
    assert "encoding -> dispatching" in shown.stdout and "parse time    2.50 s" in shown.stdout
    assert cli("jobs", "show", "1.2.3.1", "--config", str(config)).returncode == 0  # by SOP Instance UID
    assert cli("jobs", "show", "77", "--config", str(config)).returncode == 1

    retried = cli("jobs", "retry", "--all-failed", "--config", str(config))
    assert retried.returncode == 0
    assert f"job {ids[0]}: received again" in retried.stdout
    assert f"job {ids[1]}: dispatching again" in retried.stdout
    again = cli("jobs", "retry", str(ids[0]), "--config", str(config))
    assert again.returncode == 1 and "only failed jobs can be retried" in again.stderr


def test_jobs_without_a_store_says_so(tmp_path: Path) -> None:
    done = cli("jobs", "list", "--config", str(write_config(tmp_path, 104)))
    assert done.returncode == 1 and "no job store at" in done.stderr
