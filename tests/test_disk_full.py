"""The disk watermark on a real small disk: a running node refuses photos with 0xA700 before its
data directory fills, says so on /readyz, stays up, and takes photos again by itself once space is
freed (past the hysteresis). Nothing it acknowledged is lost.

The data directory is a 40 MiB tmpfs mounted by the test (the tests run as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.intake.watermark import MB, DiskWatermark, free_bytes
from dicom_node.net import status
from tests.node_fixtures import NODE_AET, SCU_AET, free_port, node_config, wait_until
from tests.photo_factory import VL_PHOTOGRAPHIC, make_vl_photo

TMPFS_SIZE = "40m"
MIN_FREE_MB = 8
RESUME_EXTRA_MB = 8  # intake resumes at 16 MB free
PHOTO_SIDE = 700  # 700 x 700 x 3 = 1.47 MB uncompressed


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 40 MiB tmpfs at ``tmp_path/data``, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("test_disk_full mounts a tmpfs and must run as root (as scripts/test.sh does in CI)")
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True)
        if done.returncode != 0:  # something still holds a file open: detach it anyway
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(path: Path, megabytes: float) -> Path:
    with open(path, "wb") as out:
        out.write(b"\xa5" * int(megabytes * MB))
    return path


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Sender:
    """One association that stays open across refusals, as a PACS retrying would keep it."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title=SCU_AET)
        ae.add_requested_context(VL_PHOTOGRAPHIC, "1.2.840.10008.1.2.1")
        ae.add_requested_context(Verification)
        self.assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        assert self.assoc.is_established
        rgb = np.random.default_rng(3).integers(0, 256, (PHOTO_SIDE, PHOTO_SIDE, 3), np.uint8)
        self.template = make_vl_photo(rgb)

    def photo(self) -> Dataset:
        ds = self.template.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return ds

    def store(self) -> tuple[str, int]:
        ds = self.photo()
        answer = self.assoc.send_c_store(ds)
        assert "Status" in answer, "no response: the node dropped the association"
        return ds.SOPInstanceUID, int(answer.Status)

    def echo(self) -> int:
        return int(self.assoc.send_c_echo().Status)


def test_a_full_disk_is_refused_before_writing_and_intake_resumes(node_factory, small_model_dir: Path,
                                                                  small_disk: Path) -> None:
    http_port = free_port()
    config = node_config(small_disk, small_model_dir, free_port(), free_port(),
                         worker={"count": 0},  # received photos stay queued: the disk only fills
                         intake={"min_free_disk_mb": MIN_FREE_MB, "resume_free_disk_mb": RESUME_EXTRA_MB},
                         http={"port": http_port})
    node = node_factory(config)
    node.start(wait_ready=False)  # no worker: never "ready" for photos, but listening
    node.wait_listening()
    big_filler = fill(small_disk / "filler-big.bin", 12)
    small_filler = fill(small_disk / "filler-small.bin", 3)
    sender = Sender(node.port)

    # the HTTP side starts after the DICOM port listens
    code, body = wait_until(lambda: readyz(http_port), 30, "the node's /readyz")
    assert body["checks"]["disk_space"]["ok"] is True, body

    acknowledged: list[str] = []
    refused: list[str] = []
    outcomes: list[int] = []
    while len(refused) < 3 and len(outcomes) < 40:
        uid, answer = sender.store()
        outcomes.append(answer)
        (acknowledged if answer == status.SUCCESS else refused).append(uid)
        if refused:
            assert answer == status.OUT_OF_RESOURCES, f"refusal {status.describe(answer)} after {outcomes}"
    assert refused and acknowledged, f"the disk never filled, or nothing was taken: {outcomes}"
    assert set(outcomes) == {status.SUCCESS, status.OUT_OF_RESOURCES}
    first_refusal = outcomes.index(status.OUT_OF_RESOURCES)
    assert all(o == status.OUT_OF_RESOURCES for o in outcomes[first_refusal:]), "no success after a refusal"
    free_mb = free_bytes(small_disk) / MB
    assert free_mb >= MIN_FREE_MB, f"intake wrote past the watermark: {free_mb:.1f} MB free"
    assert free_mb - PHOTO_SIDE**2 * 3 / MB < MIN_FREE_MB, f"refused with room for another photo ({free_mb:.1f} MB)"

    assert sender.echo() == status.SUCCESS, "the node stays up and answers"
    code, body = readyz(http_port)
    disk = body["checks"]["disk_space"]
    assert code == 503 and disk["ok"] is False and "refuses photos" in disk["detail"], body

    # Hysteresis: 3 MB more would fit one photo above the watermark, but not the resume level.
    small_filler.unlink()
    assert MIN_FREE_MB + 1.5 < free_bytes(small_disk) / MB < MIN_FREE_MB + RESUME_EXTRA_MB
    uid, answer = sender.store()
    assert answer == status.OUT_OF_RESOURCES, "resumed before the resume level"
    refused.append(uid)

    big_filler.unlink()  # the administrator frees space: intake resumes by itself
    assert free_bytes(small_disk) / MB >= MIN_FREE_MB + RESUME_EXTRA_MB
    code, body = readyz(http_port)
    assert body["checks"]["disk_space"]["ok"] is True, body
    uid, answer = sender.store()
    assert answer == status.SUCCESS
    acknowledged.append(uid)
    sender.assoc.release()

    jobs = {job.sop_instance_uid: job for job in node.jobs()}
    assert set(jobs) == set(acknowledged), "every acknowledged photo has a job, no refused one has"
    for uid in acknowledged:
        assert (small_disk / jobs[uid].photo_path).is_file(), f"acknowledged photo {uid} is not spooled"
    assert len(list((small_disk / "spool" / "photos").rglob("*.dcm"))) == len(acknowledged)
    assert node.process is not None and node.process.poll() is None
    log = node.log_text()
    assert log.count("event=intake.disk_low") == 1, "one ERROR line per minute of refusing, not one per photo"
    assert log.count("event=intake.disk_ok") == 1 and "Traceback" not in log


def test_the_watermark_counts_the_object_and_what_others_are_writing(small_disk: Path) -> None:
    """Reservations of parallel C-STOREs count against the watermark together; hysteresis as configured.
    (On the test's own tmpfs: nobody else writes there while it counts.)"""
    free = free_bytes(small_disk)
    watermark = DiskWatermark(small_disk, free - 10 * MB, 5 * MB)  # 10 MB of room above the watermark
    first = watermark.reserve(6 * MB)
    assert first is not None
    assert watermark.reserve(6 * MB) is None, "two 6 MB objects at once would go below the watermark"
    assert watermark.refusing and watermark.state().refusing
    assert watermark.reserve(1 * MB) is None, "1 MB fits above the watermark, but refusing resumes only 5 MB above"
    first.release()
    second = watermark.reserve(1 * MB)
    assert second is not None and not watermark.refusing, "10 MB above the watermark again: resumed"
    second.release()
    lower = DiskWatermark(small_disk, free - 20 * MB, 5 * MB)
    with lower.reserve(6 * MB) as room:
        assert room is not None and lower.state().reserved_bytes == 6 * MB
    assert lower.state().reserved_bytes == 0 and not lower.refusing
