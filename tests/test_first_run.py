"""A first run as a new user makes it: `scripts/run-node.sh` on the embedded defaults, with no model and
no model hub (this machine reaches only the package registries).

The node must start anyway, take photos durably, say "no model" (readiness, log, web page), and parse the
queue as soon as a model is put in place, without a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.node_fixtures import (
    PROCESS_TIMEOUT_S,
    REPO,
    StoreSCP,
    free_port,
    storescu,
    wait_until,
    write_photos,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb

DEFAULT_CALLER = "ORTHANC"  # the caller and destination of the embedded config/node.toml
DEFAULT_NODE_AET = "DICOM_NODE"


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def first_run(tmp_path: Path):
    """`scripts/run-node.sh` as shipped; only the places a test must own (ports, directories, the
    PACS's port) come from the environment, every other setting is config/node.toml's."""
    pacs = StoreSCP(tmp_path / "pacs", aet=DEFAULT_CALLER).start()
    node_port, http_port = free_port(), free_port()
    model_dir = tmp_path / "models" / "m2fp"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "DICOM_NODE_PORT": str(node_port),
        "DICOM_NODE_HTTP__PORT": str(http_port),
        "DICOM_NODE_DATA_DIR": str(tmp_path / "data"),
        "DICOM_NODE_MODEL_DIR": str(model_dir),
        "DICOM_NODE_DESTINATIONS": json.dumps([{"name": "pacs", "ae_title": DEFAULT_CALLER, "host": "127.0.0.1",
                                                 "port": pacs.port}]),
    })
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(["bash", "scripts/run-node.sh"], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    run = {"process": process, "log": log_path, "node_port": node_port, "http_port": http_port,
           "model_dir": model_dir, "pacs": pacs, "data_dir": tmp_path / "data"}
    try:
        yield run
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pacs.stop()


def test_run_node_starts_without_a_model_queues_photos_and_parses_them_once_a_model_is_put_in_place(
        first_run: dict[str, Any], tmp_path: Path) -> None:
    process, log_path = first_run["process"], first_run["log"]
    http = f"http://127.0.0.1:{first_run['http_port']}"

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def answering() -> tuple[int, Any] | None:
        if process.poll() is not None:
            raise AssertionError(f"run-node.sh exited with {process.returncode}:\n{log_text()[-3000:]}")
        try:
            return get_json(f"{http}/readyz")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    code, ready = wait_until(answering, 180, "run-node.sh to set up and start the node (HTTP answering)")
    assert code == 503 and ready["ready"] is False
    assert not ready["checks"]["model"]["ok"] and "no model" in ready["checks"]["model"]["detail"]
    assert "dicom-node model fetch" in ready["checks"]["model"]["detail"]

    photo = make_vl_photo(synthetic_rgb(64, 96))
    sent = storescu(write_photos([photo], tmp_path / "in"), first_run["node_port"], calling_aet=DEFAULT_CALLER,
                    called_aet=DEFAULT_NODE_AET)
    assert sent.returncode == 0, sent.stderr  # storescu fails on any status but 0x0000 (Success)
    (job,) = get_json(f"{http}/api/v1/jobs")[1]["jobs"]
    assert job["sop_instance_uid"] == photo.SOPInstanceUID and job["state"] == "received"

    # the web pages carry the banner the script fills from /readyz
    assert 'id="model-banner"' in get_text(f"{http}/") and 'id="model-banner"' in get_text(f"{http}/dashboard")
    # the node tried to download the official weights and said, once, why it could not
    wait_until(lambda: "event=model.fetch_failed" in log_text(), 120, "the background fetch to give up offline")
    assert "ERROR dicom_node.health: event=health.not_ready" in log_text()
    assert "no model in" in log_text()
    assert "Traceback" not in log_text()

    made = subprocess.run([sys.executable, "-m", "dicom_node", "model", "make-test", "--small", "--dir",
                           str(first_run["model_dir"])], capture_output=True, text=True, cwd=REPO,
                          timeout=PROCESS_TIMEOUT_S)
    assert made.returncode == 0, made.stderr

    def done() -> Any:
        (current,) = get_json(f"{http}/api/v1/jobs")[1]["jobs"]
        return current if current["state"] in ("done", "failed") else None

    finished = wait_until(done, 240, "the queued photo to be parsed and sent once the model is in place")
    assert finished["state"] == "done", finished
    received = list((tmp_path / "pacs").rglob("*"))
    assert len([p for p in received if p.is_file()]) >= 3, "SEG, SC and SR reached the PACS"
    code, ready = get_json(f"{http}/readyz")
    assert code == 200 and ready["ready"] is True
    assert "event=model.found" in log_text()
    assert process.poll() is None, "the same node process: no restart"
