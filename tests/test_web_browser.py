"""The web UI in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The server is the app mounted on a running node: the node's intake, worker process and dispatcher
run in this process over a fresh data directory, photos arrive over DICOM (``python -m dicom_node
send``, a real C-STORE), results go to a dcmtk storescp, and one caller's results go to a destination
that is down, so its job fails and can be retried from the dashboard. The node serves the app
itself (its ``[http]`` section) and its stages report to /metrics.
Screenshots are written to ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import HttpSettings, NodeConfig
from dicom_node.node import Node
from dicom_node.queue.job import FINAL_STATES, Job, JobState
from dicom_node.web.server import HttpServer
from tests.node_fixtures import REPO, StoreSCP, free_port, wait_until, write_photos
from tests.photo_factory import make_vl_photo, synthetic_rgb
from tests.web_fixtures import ARTIFACTS, LiveServer, decode_png, fill_job_store, make_app, png_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NODE_AET = "DICOM_NODE"
GOOD_CALLER = "TESTSCU"  # results go to the running storescp
OFFLINE_CALLER = "OFFLINESCU"  # results go to a port nobody listens on
UI_TIMEOUT_MS = 60_000
JOB_TIMEOUT_S = 90.0
PHOTO_HW = (240, 320)  # big enough for a readable screenshot, small enough for two busy cores


@dataclass
class WebNode:
    node: Node
    http: HttpServer
    data_dir: Path
    photos_dir: Path

    @property
    def url(self) -> str:
        return self.http.url

    def send(self, calling_ae: str, name: str) -> str:
        """C-STORE one new photo to the node with ``python -m dicom_node send``; returns its SOP Instance UID."""
        photo = make_vl_photo(synthetic_rgb(*PHOTO_HW))
        path = write_photos([photo], self.photos_dir / name)[0]
        sent = subprocess.run(
            [sys.executable, "-m", "dicom_node", "send", str(path), "--to", f"127.0.0.1:{self.node.intake.port}",
             "--aet", NODE_AET, "--calling-aet", calling_ae, "--timeout", "30"],
            cwd=REPO, capture_output=True, text=True, timeout=90,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        return str(photo.SOPInstanceUID)

    def job(self, sop_instance_uid: str) -> Job | None:
        assert self.node.store is not None
        return self.node.store.find(sop_instance_uid)

    def wait_final(self, sop_instance_uid: str) -> Job:
        def final() -> Job | None:
            job = self.job(sop_instance_uid)
            return job if job is not None and job.state in FINAL_STATES else None

        return wait_until(final, JOB_TIMEOUT_S, f"the job of {sop_instance_uid} to finish")


@pytest.fixture(scope="module")
def web_node(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebNode]:
    workdir = tmp_path_factory.mktemp("web_node")
    pacs = StoreSCP(workdir / "pacs").start()
    config = NodeConfig(
        ae_title=NODE_AET, port=free_port(), node_id="webtest", data_dir=workdir / "data", model_dir=small_model_dir,
        auto_fetch_model=False, log_level="INFO",
        callers=[{"ae_title": GOOD_CALLER, "host": "127.0.0.1", "return_to": "pacs"},
                 {"ae_title": OFFLINE_CALLER, "host": "127.0.0.1", "return_to": "offline"}],
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port},
                      {"name": "offline", "ae_title": "OFFLINE", "host": "127.0.0.1", "port": free_port()}],
        worker={"count": 1, "torch_threads": 1, "restart_delay_s": 0.5, "poll_interval_s": 0.05},
        dispatch={"max_attempts": 1, "give_up_after_h": 0, "timeout_s": 10.0, "poll_interval_s": 0.05},
        http={"port": 0, "parse_threads": 1},
    )
    node = Node(config)
    node.start()
    http = node.http
    try:
        assert http is not None and http.running
        assert node.health is not None
        wait_until(lambda: node.health.ready, 90, "the node's worker to load the model")
        yield WebNode(node, http, config.data_dir, workdir / "photos")
    finally:
        node.stop()
        pacs.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def image_loaded(page: Page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


# --------------------------------------------------------------------------- parse page


def test_parse_page_shows_both_images_statistics_and_downloads(web_node: WebNode, page: Page, tmp_path: Path) -> None:
    photo = tmp_path / "body_photo.png"
    photo.write_bytes(png_bytes(synthetic_rgb(*PHOTO_HW)))
    page.goto(web_node.url + "/")
    expect(page.locator("#ready-badge")).to_have_text("ready")
    page.set_input_files("#file-input", str(photo))

    expect(page.locator("#results")).to_be_visible()
    expect(page.locator("#results")).to_have_attribute("data-ready", "true")
    page.wait_for_function("""() => ['#original-img', '#seg-img'].every(s => {
        const img = document.querySelector(s); return img.complete && img.naturalWidth > 0; })""")
    assert page.eval_on_selector("#original-img", "img => [img.naturalWidth, img.naturalHeight]") == [320, 240]
    assert page.eval_on_selector("#seg-img", "img => [img.naturalWidth, img.naturalHeight]") == [320, 240]
    expect(page.locator("#progress")).to_be_hidden()
    expect(page.locator("#warning")).to_contain_text("UNTRAINED")

    # the API's own answer for the same file
    answer = httpx2.post(f"{web_node.url}/api/predict?format=json",
                         files={"image": (photo.name, photo.read_bytes(), "image/png")}, timeout=120).json()
    rows = page.locator("#stats-body tr")
    expect(rows).to_have_count(len(answer["metadata"]["regions"]))
    first = answer["metadata"]["regions"][0]
    expect(rows.nth(0).locator("td").nth(1)).to_have_text(first["label"])
    swatch = rows.nth(0).locator(".swatch").evaluate("el => getComputedStyle(el).backgroundColor")
    classes = {c["index"]: c["color"] for c in httpx2.get(f"{web_node.url}/api/v1/classes").json()}
    assert swatch == "rgb({}, {}, {})".format(*classes[first["class_index"]])

    # the overlay slider changes the segmentation layer's opacity
    page.locator("#opacity").fill("30")
    expect(page.locator("#opacity-value")).to_have_text("30%")
    assert page.eval_on_selector("#seg-img", "img => img.style.opacity") == "0.3"
    page.locator("#opacity").fill("70")
    screenshot(page, "web-parse-page")

    with page.expect_download() as download_info:
        page.click("#download-json")
    download = download_info.value
    assert download.suggested_filename == "body_photo.json"
    downloaded = json.loads(Path(download.path()).read_text())
    api_report = dict(answer["report"])
    assert set(downloaded.pop("timings_s")) == set(api_report.pop("timings_s"))  # two parses: times differ
    assert downloaded == api_report

    with page.expect_download() as download_info:
        page.click("#download-color")
    colour = decode_png(Path(download_info.value.path()).read_bytes())
    assert np.array_equal(colour, decode_png(base64.b64decode(answer["images"]["color_png"])))
    with page.expect_download() as download_info:
        page.click("#download-overlay")
    assert download_info.value.suggested_filename == "body_photo_overlay.png"
    assert decode_png(Path(download_info.value.path()).read_bytes()).shape == (*PHOTO_HW, 3)


def test_parse_page_shows_progress_then_a_dicom_photo(web_node: WebNode, page: Page, tmp_path: Path) -> None:
    path = write_photos([make_vl_photo(synthetic_rgb(*PHOTO_HW))], tmp_path)[0]
    page.goto(web_node.url + "/")
    held: list[Route] = []  # the request waits here, as behind a slow parse, until the test lets it go
    page.route("**/api/predict**", lambda route: held.append(route))
    page.set_input_files("#file-input", str(path))
    expect(page.locator("#progress")).to_be_visible()
    expect(page.locator("#progress-text")).to_have_text(re.compile("Uploading|Parsing"))
    page.wait_for_function("() => document.querySelector('#progress-time').textContent !== ''", timeout=5000)
    screenshot(page, "web-parse-progress")
    wait_until(lambda: held, 10, "the upload to reach the network")
    held[0].continue_()
    expect(page.locator("#results")).to_have_attribute("data-ready", "true")
    expect(page.locator("#progress")).to_be_hidden()
    page.wait_for_function("() => document.querySelector('#original-img').naturalWidth === 320")
    assert image_loaded(page, "#seg-img")


def test_parse_page_explains_a_bad_file(web_node: WebNode, page: Page, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.goto(web_node.url + "/")
    page.set_input_files("#file-input", str(notes))
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("This file type is not supported")
    expect(error).to_contain_text("only JPEG, PNG and DICOM")
    expect(page.locator("#progress")).to_be_hidden()
    expect(page.locator("#results")).to_be_hidden()
    screenshot(page, "web-parse-error")


# --------------------------------------------------------------------------- dashboard


def test_dashboard_lists_jobs_that_arrived_over_dicom_and_retries_a_failed_one(web_node: WebNode, page: Page) -> None:
    failing_uid = web_node.send(OFFLINE_CALLER, "offline")
    failed = web_node.wait_final(failing_uid)
    assert failed.state == JobState.FAILED and "offline" in (failed.reason or "")

    page.goto(web_node.url + "/dashboard")
    failed_row = page.locator(f"#jobs-body tr[data-job-id='{failed.id}']")
    expect(failed_row).to_have_attribute("data-state", "failed")
    expect(failed_row).to_contain_text(OFFLINE_CALLER)
    expect(failed_row).to_contain_text("offline")
    expect(failed_row.locator("td.reason")).to_contain_text("gave up after 1 dispatch attempts")
    expect(page.locator("#count-failed")).not_to_have_text("0")

    # a photo arriving while the page is open appears without a reload
    page.evaluate("window.__noReload = true")
    good_uid = web_node.send(GOOD_CALLER, "good")
    done = web_node.wait_final(good_uid)
    assert done.state == JobState.DONE, done.reason
    done_row = page.locator(f"#jobs-body tr[data-job-id='{done.id}']")
    expect(done_row).to_have_attribute("data-state", "done", timeout=UI_TIMEOUT_MS)
    expect(done_row).to_contain_text(GOOD_CALLER)
    expect(done_row).to_contain_text("pacs")
    expect(done_row.locator("button.retry")).to_have_count(0)
    assert page.evaluate("window.__noReload") is True
    expect(page.locator("#count-done")).not_to_have_text("0")
    expect(page.locator("#ready-badge")).to_have_text("ready")
    screenshot(page, "web-dashboard")

    # retry from the dashboard: the job is re-opened (and, the destination still down, fails again)
    failed_row.locator("button.retry").click()
    assert web_node.node.store is not None

    def retried() -> bool:
        return any(e.reason == "retried from the web UI" for e in web_node.node.store.history(failed.id))

    wait_until(retried, 30, "the retry to reach the job store")
    expect(page.locator("#error")).to_be_hidden()


def test_metrics_of_the_mounted_node_parse_and_count_jobs(web_node: WebNode) -> None:
    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx2.get(f"{web_node.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    uid = web_node.send(GOOD_CALLER, "metrics")
    assert web_node.wait_final(uid).state == JobState.DONE
    after = scrape()
    assert store_total(web_node) == sum(v for (name, _), v in after.items() if name == "dicom_node_jobs")
    assert after[("dicom_node_jobs", (("state", "done"),))] == before.get(("dicom_node_jobs", (("state", "done"),)),
                                                                          0) + 1
    assert ("dicom_node_open_associations", ()) in after
    # the node's stages report their events: received, parsed, dispatched
    expected = {("dicom_node_instances_received_total", (("source", "dicom"),)): 1,
                ("dicom_node_parse_seconds_count", (("source", "dicom"),)): 1,
                ("dicom_node_dispatch_attempts_total", (("destination", "pacs"),)): 1,
                ("dicom_node_dispatch_failures_total", (("destination", "pacs"),)): 0}

    def counters_moved() -> bool:
        now = scrape()  # the worker's parse time reaches the node through a pipe: allow a moment
        return all(now.get(k, 0.0) - before.get(k, 0.0) == v for k, v in expected.items())

    wait_until(counters_moved, 10, f"the counters {sorted(expected)} to move")
    ready = httpx2.get(f"{web_node.url}/readyz", timeout=30).json()
    assert ready["ready"] is True, ready
    assert set(ready["checks"]) == {"model", "job_store", "disk_space", "dicom_listener"}


def store_total(web_node: WebNode) -> int:
    assert web_node.node.store is not None
    return sum(web_node.node.store.counts().values())


# --------------------------------------------------------------------------- sign-in


def test_sign_in_when_the_node_is_reachable_from_the_network(browser: Browser, web_parser, tmp_path: Path,
                                                             job_store) -> None:
    """Settings of a node bound to the network (token required), served here on loopback only."""
    token = "browser-test-token-0123456789"
    fill_job_store(job_store)
    app = make_app(web_parser, tmp_path / "data", job_store,
                   settings=HttpSettings(bind_address="0.0.0.0", token=token))
    context = browser.new_context(viewport={"width": 1280, "height": 700})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        with LiveServer(app) as server:
            page.goto(server.url + "/dashboard")
            assert page.url == f"{server.url}/login?next=/dashboard"
            page.fill("input[name=token]", "not the token")
            page.click("button[type=submit]")
            expect(page.locator("#failed")).to_be_visible()
            screenshot(page, "web-sign-in-refused")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(server.url + "/dashboard")
            expect(page.locator("#jobs-body tr")).to_have_count(3)
            expect(page.locator("#count-failed")).to_have_text("1")
            cookies = context.cookies()
            assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
                ("dicom_node_token", True, "Strict")]
            assert page.evaluate("document.cookie") == ""  # scripts never see the token
    finally:
        context.close()
