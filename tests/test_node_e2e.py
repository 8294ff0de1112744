"""The whole node against real peers: dcmtk -> Orthanc (shipped routing rule) -> node -> Orthanc.

The node runs as ``python -m dicom_node serve`` with the tiny untrained model; Orthanc runs from
config/orthanc/ with a fresh storage directory. Results are checked over Orthanc's REST API and
with dciodvfy.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.encode.validate import run_dciodvfy
from tests.node_fixtures import (
    PACS_AET,
    SECRET_PATIENT,
    NodeProcess,
    Orthanc,
    assert_no_patient_data,
    need_tools,
    node_config,
    read,
    storescu,
    uids_in,
    wait_until,
    write_photos,
)
from tests.photo_factory import (
    make_16bit_photo,
    make_grey_photo,
    make_jpeg_photo_with_img2dcm,
    make_vl_photo,
    synthetic_rgb,
    truncate_pixel_data,
    write_dataset,
)

RESULT_MODALITIES = {"SEG", "OT", "SR"}
PARSE_BUDGET_S = 45.0  # per photo on 2 busy cores with the tiny model, generous


def _results_for(orthanc: Orthanc, study_uid: str, photo_uid: str) -> list[dict]:
    return [i for i in orthanc.study_instances(study_uid) if i["MainDicomTags"]["SOPInstanceUID"] != photo_uid]


def _check_results(orthanc: Orthanc, study_uid: str, photo_uid: str, tmp_path: Path) -> None:
    """SEG, SC and SR: in Orthanc once each, referencing the photo, dciodvfy-clean."""
    results = _results_for(orthanc, study_uid, photo_uid)
    modalities = sorted(read(orthanc.download(i["ID"])).Modality for i in results)
    assert modalities == sorted(RESULT_MODALITIES), f"results in Orthanc for {photo_uid}: {modalities}"
    for instance in results:
        data = orthanc.download(instance["ID"])
        ds = read(data)
        assert photo_uid in uids_in(ds), f"{ds.Modality} does not reference the photo"
        assert ds.StudyInstanceUID == study_uid
        path = tmp_path / f"{instance['ID']}.dcm"
        path.write_bytes(data)
        errors = run_dciodvfy(path)
        assert not errors, f"dciodvfy on the {ds.Modality}: {errors}"


def test_photos_routed_by_orthanc_come_back_as_seg_sc_sr(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    need_tools("img2dcm")
    node = node_factory(node_config(tmp_path / "data", small_model_dir, node_port, running_orthanc.dicom_port))
    node.start()
    plain = make_vl_photo(synthetic_rgb(120, 160), **SECRET_PATIENT)
    plain_path = write_photos([plain], tmp_path / "in")[0]
    jpeg_path = make_jpeg_photo_with_img2dcm(synthetic_rgb(120, 160), tmp_path / "in")
    jpeg = read(jpeg_path)

    assert storescu([plain_path], running_orthanc.dicom_port, called_aet=PACS_AET).returncode == 0
    sent = storescu([jpeg_path], running_orthanc.dicom_port, called_aet=PACS_AET, jpeg=True)
    assert sent.returncode == 0, sent.stderr

    for photo in (plain, jpeg):
        wait_until(lambda p=photo: len(_results_for(running_orthanc, p.StudyInstanceUID, p.SOPInstanceUID)) >= 3,
                   2 * PARSE_BUDGET_S, f"results of {photo.SOPInstanceUID} in Orthanc")
    time.sleep(0.5)  # anything sent twice would show up now
    for photo in (plain, jpeg):
        _check_results(running_orthanc, photo.StudyInstanceUID, photo.SOPInstanceUID, tmp_path)

    jobs = {j.sop_instance_uid: j for j in node.jobs()}
    assert {plain.SOPInstanceUID, jpeg.SOPInstanceUID} <= set(jobs)
    assert all(j.state.value == "done" and j.calling_ae == PACS_AET for j in jobs.values())
    assert jobs[jpeg.SOPInstanceUID].transfer_syntax_uid == "1.2.840.10008.1.2.4.50"  # not transcoded

    # the same photo again, straight to the node: acknowledged, but no second set of results
    assert storescu([plain_path], node.port).returncode == 0
    time.sleep(1.0)
    assert len(node.jobs()) == 2
    assert len(_results_for(running_orthanc, plain.StudyInstanceUID, plain.SOPInstanceUID)) == 3
    assert "event=intake.duplicate" in node.log_text()
    assert node.stop() == 0
    assert_no_patient_data(node.log_text())


def test_results_wait_out_a_pacs_outage_and_arrive_once(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    orthanc = running_orthanc
    node = node_factory(node_config(tmp_path / "data", small_model_dir, node_port, orthanc.dicom_port))
    node.start()
    orthanc.stop()
    try:
        photos = [make_vl_photo(synthetic_rgb(96, 144), **SECRET_PATIENT) for _ in range(2)]
        sent = storescu(write_photos(photos, tmp_path / "in"), node.port)
        assert sent.returncode == 0, sent.stderr

        def waiting_for_pacs() -> bool:
            jobs = node.jobs()
            return len(jobs) == 2 and all(j.state.value == "dispatching" and j.dispatch_attempts >= 2 for j in jobs)

        wait_until(waiting_for_pacs, 2 * PARSE_BUDGET_S, "both jobs to fail dispatch at least twice")
        job = node.jobs()[0]
        assert job.not_before is not None and "next attempt" in job.reason
    finally:
        orthanc.start()

    jobs = node.wait_jobs_final(2, 30)
    assert all(j.state.value == "done" for j in jobs), [(j.state, j.reason) for j in jobs]
    time.sleep(0.5)
    for photo in photos:
        results = orthanc.study_instances(photo.StudyInstanceUID)
        assert len(results) == 3, "each result exactly once"
        assert sorted(read(orthanc.download(i["ID"])).Modality for i in results) == sorted(RESULT_MODALITIES)
    for job in jobs:
        assert len(job.deliveries) == 3
    assert_no_patient_data(node.log_text())


def test_sigkill_after_acknowledging_ten_photos_loses_nothing(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    orthanc = running_orthanc
    config = node_config(tmp_path / "data", small_model_dir, node_port, orthanc.dicom_port)
    node = node_factory(config)
    node.start()
    photos = [make_vl_photo(synthetic_rgb(64, 96), **SECRET_PATIENT) for _ in range(10)]
    paths = write_photos(photos, tmp_path / "in")
    worker_pids = [w["pid"] for w in node.health()["workers"].values() if w.get("pid")]

    sent = storescu(paths, node.port)
    node.kill9()  # right after the 10th acknowledgement
    assert sent.returncode == 0, sent.stderr

    # the workers die with the node (no orphan keeps processing)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in worker_pids), 10, "workers to die")
    committed = node.jobs()
    assert {j.sop_instance_uid for j in committed} == {p.SOPInstanceUID for p in photos}, \
        "every acknowledged photo has a committed job"

    node.start()
    jobs = node.wait_jobs_final(10, 10 * PARSE_BUDGET_S)
    assert all(j.state.value == "done" for j in jobs), [(j.id, j.state, j.reason) for j in jobs]
    time.sleep(0.5)
    for photo in photos:
        instances = orthanc.study_instances(photo.StudyInstanceUID)
        modalities = sorted(read(orthanc.download(i["ID"])).Modality for i in instances)
        assert modalities == sorted(RESULT_MODALITIES), f"{photo.SOPInstanceUID}: {modalities} (no duplicates)"
    assert_no_patient_data(node.log_text())


def _ct_image(tmp_path: Path) -> Path:
    ds = make_vl_photo(synthetic_rgb(32, 48))
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPClassUID = ct
    ds.file_meta.MediaStorageSOPClassUID = ct
    ds.Modality = "CT"
    return write_dataset(ds, tmp_path / "ct.dcm")


def test_bad_callers_and_bad_photos_do_not_stop_the_node(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    orthanc = running_orthanc
    node = node_factory(node_config(tmp_path / "data", small_model_dir, node_port, orthanc.dicom_port))
    node.start()
    good = make_vl_photo(synthetic_rgb(96, 144), **SECRET_PATIENT)
    good_path = write_photos([good], tmp_path / "good")[0]

    stranger = storescu([good_path], node.port, calling_aet="STRANGER")
    assert stranger.returncode != 0 and "Association Rejected" in stranger.stderr + stranger.stdout

    ct = storescu([_ct_image(tmp_path)], node.port)
    assert ct.returncode != 0
    assert "presentation context" in (ct.stderr + ct.stdout).lower()
    assert node.jobs() == []

    corrupt = truncate_pixel_data(make_vl_photo(synthetic_rgb(96, 144), **SECRET_PATIENT), 5000)
    grey = make_grey_photo(np.full((96, 144), 128, np.uint8), **SECRET_PATIENT)
    deep = make_16bit_photo(np.full((96, 144), 1000, np.uint16), **SECRET_PATIENT)
    corrupt_path, *bad_paths = write_photos([corrupt, grey, deep], tmp_path / "bad")
    refused = storescu([corrupt_path], node.port)  # pixel data that can never be decoded: 0xC000 at intake
    assert refused.returncode != 0, refused.stdout
    for path in [*bad_paths, good_path]:  # one association each, in a row
        sent = storescu([path], node.port)
        assert sent.returncode == 0, sent.stderr

    jobs = {j.sop_instance_uid: j for j in node.wait_jobs_final(3, 3 * PARSE_BUDGET_S)}
    assert corrupt.SOPInstanceUID not in jobs
    assert jobs[deep.SOPInstanceUID].state.value == "failed"
    assert "16-bit" in jobs[deep.SOPInstanceUID].reason
    assert jobs[grey.SOPInstanceUID].state.value in ("done", "failed") and (
        jobs[grey.SOPInstanceUID].state.value == "done" or jobs[grey.SOPInstanceUID].reason)
    assert jobs[good.SOPInstanceUID].state.value == "done"
    wait_until(lambda: len(orthanc.study_instances(good.StudyInstanceUID)) == 3, 20, "the good photo's results")
    for job in jobs.values():
        assert job.attempts == 1, "a bad photo is not retried"
    assert node.process.poll() is None
    assert_no_patient_data(node.log_text())


def test_broken_model_keeps_accepting_and_says_not_ready(
    node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    need_tools("storescu")
    model_dir = tmp_path / "broken_model"
    model_dir.mkdir()
    (model_dir / "configuration.json").write_bytes((small_model_dir / "configuration.json").read_bytes())
    (model_dir / "pytorch_model.pt").write_bytes(b"not a checkpoint")
    config = node_config(tmp_path / "data", model_dir, node_port, 9, worker={"not_ready_log_interval_s": 1.0,
                                                                              "model_retry_interval_s": 30.0})
    node = node_factory(config)
    node.start(wait_ready=False)
    node.wait_listening()
    health = wait_until(lambda: (h := node.health()) and "cannot be loaded" in h["problems"].get("model", "")
                        and h, 60, "health to report the model problem")
    assert health["ready"] is False

    photo = make_vl_photo(synthetic_rgb(64, 96), **SECRET_PATIENT)
    sent = storescu(write_photos([photo], tmp_path / "in"), node.port)
    assert sent.returncode == 0, "intake goes on without a model"
    assert [j.state.value for j in node.jobs()] == ["received"]
    wait_until(lambda: node.log_text().count("event=health.not_ready") >= 2, 15, "repeated not-ready ERROR lines")
    assert "ERROR dicom_node.health: event=health.not_ready" in node.log_text()
    assert node.stop() == 0
    assert_no_patient_data(node.log_text())


def test_sigterm_to_the_whole_process_group_is_a_quiet_stop(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    """systemd stops a service with SIGTERM to every process of its group, the workers too. That is
    a normal stop: exit 0, each worker logs its own stop (it was not killed: the parent-death signal
    follows the pool's thread, which must outlive the workers), and no ERROR line."""
    import signal

    config = node_config(tmp_path / "data", small_model_dir, node_port, running_orthanc.dicom_port)
    node = node_factory(config)
    node.start(own_process_group=True)
    assert node.process is not None
    os.killpg(node.process.pid, signal.SIGTERM)
    assert node.process.wait(timeout=60) == 0
    log = node.log_text()
    assert "event=node.stopped" in log and "event=worker.stopped" in log, log[-2000:]
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert errors == []


def worker_exits(node: NodeProcess) -> dict[str, float]:
    """``dicom_node_worker_exits_total`` by reason, scraped from the running node's /metrics."""
    port = re.search(r"event=http\.listening address=\S+ port=(\d+)", node.log_text())
    assert port is not None, node.log_text()[-3000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as response:
        return {s.labels["reason"]: s.value for family in text_string_to_metric_families(response.read().decode())
                for s in family.samples if s.name == "dicom_node_worker_exits_total"}


def test_a_killed_worker_is_restarted(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    config = node_config(tmp_path / "data", small_model_dir, node_port, running_orthanc.dicom_port,
                         worker={"deaths_before_not_ready": 1})
    node = node_factory(config)
    health = node.start().health()
    (old_pid,) = [w["pid"] for w in health["workers"].values()]
    os.kill(old_pid, 9)

    def restarted() -> dict | None:
        health = node.health() or {}
        workers = health.get("workers", {})
        ready = any(w.get("pid") not in (None, old_pid) and w.get("state") == "ready" for w in workers.values())
        return health if ready else None

    health = wait_until(restarted, 60, "a new worker")
    assert "event=worker.died" in node.log_text()
    assert worker_exits(node) == {"died": 1.0, "recycled": 0.0, "no_model": 0.0}
    # deaths_before_not_ready = 1: a dying worker is reported loudly even though a new one runs
    assert not health["ready"] and "workers keep dying" in health["problems"]["workers"]
    assert "ERROR dicom_node.health: event=health.not_ready" in node.log_text()
    photo = make_vl_photo(synthetic_rgb(64, 96))
    assert storescu(write_photos([photo], tmp_path / "in"), node.port).returncode == 0
    (job,) = node.wait_jobs_final(1, PARSE_BUDGET_S)
    assert job.state.value == "done"


def test_a_broken_model_fixed_in_place_is_loaded_at_once_without_a_restart(
        node_factory, node_port: int, small_model_dir: Path, tmp_path: Path) -> None:
    """The files changing is news: a model that failed to load is tried again when an administrator
    replaces its files, not an hour (model_retry_interval_s) later."""
    import shutil

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(small_model_dir / "configuration.json", model_dir / "configuration.json")
    (model_dir / "pytorch_model.pt").write_bytes(b"not a checkpoint")
    config = node_config(tmp_path / "data", model_dir, node_port, 9, worker={"model_retry_interval_s": 3600.0,
                                                                               "runtime": "eager"})
    node = node_factory(config)
    node.start(wait_ready=False)

    def refused() -> dict | None:
        health = node.health()
        return health if health and "cannot be loaded" in health["problems"].get("model", "") else None

    wait_until(refused, PARSE_BUDGET_S, "the worker to report the broken model")
    photo = make_vl_photo(synthetic_rgb(64, 96))
    assert storescu(write_photos([photo], tmp_path / "in"), node.port).returncode == 0, "received anyway"

    staged = tmp_path / "weights.tmp"
    shutil.copy(small_model_dir / "pytorch_model.pt", staged)
    staged.replace(model_dir / "pytorch_model.pt")  # as `model fetch` puts files in place
    node.wait_ready(2 * PARSE_BUDGET_S)  # well before the hour of model_retry_interval_s
    def parsed() -> object:
        jobs = node.jobs()
        return jobs if jobs and jobs[0].parse_s is not None else None

    (job,) = wait_until(parsed, PARSE_BUDGET_S, "the queued photo to be parsed by the model put in place")
    assert job.state.value in ("dispatching", "done"), (job.state, job.reason)  # no PACS here: results wait
    assert "Traceback" not in node.log_text()


def test_stages_hand_over_at_once_even_with_long_polls(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    """Intake rings the workers, a worker rings dispatch (queue/doorbell.py): with 60 s polls a
    photo still comes back in seconds, and the node still stops promptly."""
    config = node_config(tmp_path / "data", small_model_dir, node_port, running_orthanc.dicom_port,
                         worker={"poll_interval_s": 60.0}, dispatch={"poll_interval_s": 60.0})
    node = node_factory(config)
    node.start()
    time.sleep(1.0)  # every stage has polled once and is waiting out its 60 s
    photo = make_vl_photo(synthetic_rgb(64, 96))
    assert storescu(write_photos([photo], tmp_path / "in"), node.port).returncode == 0
    wait_until(lambda: len(_results_for(running_orthanc, photo.StudyInstanceUID, photo.SOPInstanceUID)) >= 3,
               PARSE_BUDGET_S, "results in Orthanc well before a 60 s poll")
    started = time.monotonic()
    assert node.stop(timeout_s=30) == 0
    assert time.monotonic() - started < 15, "idle workers and dispatchers wake up to stop"


def test_a_worker_that_outgrows_its_memory_limit_is_replaced_between_jobs(
    running_orthanc: Orthanc, node_factory, node_port: int, small_model_dir: Path, tmp_path: Path
) -> None:
    """``worker.recycle_rss_mib``: a worker above it after a job exits and a fresh one takes the next
    photo at once; no job is charged, no death counted (deaths_before_not_ready = 1 would say so)."""
    config = node_config(tmp_path / "data", small_model_dir, node_port, running_orthanc.dicom_port,
                         worker={"recycle_rss_mib": 1, "deaths_before_not_ready": 1, "runtime": "eager"})
    node = node_factory(config)
    health = node.start().health()
    (first_pid,) = [w["pid"] for w in health["workers"].values()]
    photos = [make_vl_photo(synthetic_rgb(64, 96)) for _ in range(3)]
    assert storescu(write_photos(photos, tmp_path / "in"), node.port).returncode == 0
    jobs = node.wait_jobs_final(3, 3 * PARSE_BUDGET_S)
    assert [(j.state.value, j.attempts) for j in jobs] == [("done", 1)] * 3, [(j.id, j.state, j.reason) for j in jobs]
    # the third worker left after its job ended; the supervisor notices within a tick
    log = wait_until(lambda: (text := node.log_text()).count("event=worker.recycled") == 3 and text, 30,
                     "the third worker to be replaced")
    assert log.count("event=worker.recycling") == 3, log[-3000:]
    assert "event=worker.died" not in log
    health = wait_until(lambda: (h := node.health()) and h.get("ready") and h, 60, "a ready node with a fresh worker")
    assert all(w["pid"] != first_pid for w in health["workers"].values())
    # a dashboard tells recycling from dying: /metrics counts each by its reason
    assert worker_exits(node) == {"recycled": 3.0, "died": 0.0, "no_model": 0.0}
    assert node.stop() == 0
