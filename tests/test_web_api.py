"""The REST API against create_app with the tiny untrained model: parsing, errors, jobs, auth, health, metrics."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from dicom_node.config import HttpSettings, is_loopback
from dicom_node.monitor.metrics import SOURCE_API, SOURCE_DICOM, NodeMetrics
from dicom_node.monitor.readiness import CheckResult, Readiness, disk_space_check, job_store_check
from dicom_node.parse.render import color_label_map, overlay
from dicom_node.parse.report import UNTRAINED_WARNING, parse_report
from dicom_node.queue.job import JobState
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.web.parsing import ParserProvider
from dicom_node.web.server import HttpServer
from tests.photo_factory import make_16bit_photo
from tests.web_fixtures import (
    PHOTO_HW,
    LiveServer,
    decode_png,
    dicom_bytes,
    fill_job_store,
    jpeg_bytes,
    make_app,
    new_job,
    photo_rgb,
    png_bytes,
)

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture
def client(web_parser: ParserProvider, tmp_path: Path, job_store: SqliteJobStore) -> TestClient:
    return TestClient(make_app(web_parser, tmp_path / "data", job_store))


def upload(client: TestClient, data: bytes, name: str = "photo.png", query: str = "", **kwargs) -> httpx2.Response:
    return client.post(f"/api/predict{query}", files={"image": (name, data, "application/octet-stream")}, **kwargs)


def assert_json_error(response: httpx2.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message"} and body["message"], body
    if code is not None:
        assert body["error"] == code, body
    return body


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------------- predict


def test_predict_png_returns_the_colour_segmentation_and_metadata_header(client, web_parser) -> None:
    response = upload(client, png_bytes())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    expected = web_parser.get().parse(photo_rgb())
    colour = decode_png(response.content)
    assert np.array_equal(colour, color_label_map(expected.label_map))

    metadata = json.loads(response.headers["x-parse-metadata"])
    report = parse_report(expected, "photo.png")
    assert metadata["status"] == "ok"
    assert metadata["source"] == "photo.png"
    assert metadata["image_size"] == {"width": PHOTO_HW[1], "height": PHOTO_HW[0]}
    assert metadata["person_count"] == expected.person_count
    assert metadata["regions"] == report["regions"]
    assert metadata["labels_present"] == [r["label"] for r in report["regions"]]
    assert metadata["model"] == {"digest": web_parser.get().model_digest, "untrained": True,
                                 "runtime": web_parser.get().runtime.name}
    assert metadata["warning"] == UNTRAINED_WARNING
    assert metadata["inference_s"] > 0


def test_predict_json_holds_metadata_report_and_images(client, web_parser) -> None:
    response = upload(client, png_bytes(), query="?format=json&include_original=true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"status", "metadata", "report", "images"}
    assert body["status"] == "ok"
    assert body["metadata"] == json.loads(response.headers["x-parse-metadata"])

    # the report is what `dicom-node parse` writes for the same photo (only the timings differ)
    expected = web_parser.get().parse(photo_rgb())
    cli_report = json.loads(json.dumps(parse_report(expected, "photo.png")))
    api_report = dict(body["report"])
    assert set(api_report["timings_s"]) == set(cli_report.pop("timings_s"))
    api_report.pop("timings_s")
    assert api_report == cli_report

    images = {k: decode_png(base64.b64decode(v)) for k, v in body["images"].items()}
    assert np.array_equal(images["color_png"], color_label_map(expected.label_map))
    assert np.array_equal(images["overlay_png"], overlay(photo_rgb(), expected.label_map,
                                                         class_names=expected.class_names))
    assert np.array_equal(images["original_png"], photo_rgb())


def test_predict_json_leaves_the_original_out_unless_asked(client) -> None:
    body = upload(client, png_bytes(), query="?format=json").json()
    assert body["images"]["original_png"] is None


def test_predict_jpeg(client) -> None:
    response = upload(client, jpeg_bytes(), name="camera.JPG")
    assert response.status_code == 200, response.text
    metadata = json.loads(response.headers["x-parse-metadata"])
    assert metadata["source"] == "camera.JPG"
    assert decode_png(response.content).shape == (*PHOTO_HW, 3)
    assert 'filename="camera_color.png"' in response.headers["content-disposition"]


@pytest.mark.parametrize("preamble", [True, False], ids=["part10", "bare-dataset"])
def test_predict_dicom(client, web_parser, preamble: bool) -> None:
    response = upload(client, dicom_bytes(preamble=preamble), name="photo.dcm", query="?format=json&include_original=1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["metadata"]["image_size"] == {"width": PHOTO_HW[1], "height": PHOTO_HW[0]}
    original = decode_png(base64.b64decode(body["images"]["original_png"]))
    assert np.array_equal(original, photo_rgb())  # uncompressed RGB: the very pixels
    expected = web_parser.get().parse(photo_rgb())
    assert np.array_equal(decode_png(base64.b64decode(body["images"]["color_png"])),
                          color_label_map(expected.label_map))


def test_predict_names_the_upload_safely(client) -> None:
    response = upload(client, png_bytes(), name='..\\..\\evil"\r\nname\u00e9.png')
    assert response.status_code == 200
    metadata = json.loads(response.headers["x-parse-metadata"])
    assert "\\" not in metadata["source"] and "\r" not in metadata["source"] and '"' not in metadata["source"]
    assert response.headers["content-disposition"].isascii()


# --------------------------------------------------------------------------- bad input


def test_missing_image_field_is_400(client) -> None:
    assert_json_error(client.post("/api/predict"), 400, "bad_request")
    assert_json_error(client.post("/api/predict", data={"other": "x"}), 400, "bad_request")


def test_empty_file_is_400(client) -> None:
    assert_json_error(upload(client, b""), 400, "empty_upload")


def test_truncated_png_is_400_with_a_reason(client) -> None:
    body = assert_json_error(upload(client, png_bytes()[:200], name="cut.png"), 400, "corrupt_photo")
    assert "cut.png" in body["message"] and "dicom-node-upload" not in body["message"]


@pytest.mark.parametrize("data", [b"hello, not a photo", b"GIF89a" + b"\x00" * 64, b"%!PS-Adobe-3.0 EPSF-3.0\n"],
                         ids=["text", "gif", "postscript"])
def test_other_formats_are_415(client, data: bytes) -> None:
    assert_json_error(upload(client, data, name="x.bin"), 415, "unsupported_media_type")


def test_dicom_we_do_not_handle_is_415(client) -> None:
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    make_16bit_photo(photo_rgb()[:, :, 0].astype(np.uint16) * 200).save_as(buffer, enforce_file_format=True)
    body = assert_json_error(upload(client, buffer.getvalue(), name="deep.dcm"), 415, "unsupported_photo")
    assert "8-bit" in body["message"]


def test_upload_over_the_size_limit_is_413(web_parser, tmp_path) -> None:
    settings = HttpSettings(max_upload_bytes=4096)
    client = TestClient(make_app(web_parser, tmp_path, settings=settings))
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    assert len(big) > 4096 + 64 * 1024
    body = assert_json_error(upload(client, big), 413, "too_large")
    assert "limit of 4.1 kB" in body["message"]

    # the same without a Content-Length: the body is counted as it streams in
    boundary = "testboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():
        yield head
        for start in range(0, len(big), 16384):
            yield big[start:start + 16384]
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/api/predict", content=chunks(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_json_error(response, 413, "too_large")


def test_photo_with_too_many_pixels_is_413(web_parser, tmp_path) -> None:
    client = TestClient(make_app(web_parser, tmp_path, settings=HttpSettings(max_pixels=10_000)))
    for data, name in ((png_bytes(), "p.png"), (dicom_bytes(), "p.dcm")):
        body = assert_json_error(upload(client, data, name=name), 413, "too_many_pixels")
        assert "19200" in body["message"]


def test_busy_parser_answers_503_with_retry_after(tmp_path, web_parser) -> None:
    provider = ParserProvider.of(web_parser.get(), max_waiting=0)
    client = TestClient(make_app(provider, tmp_path))
    with provider.admitted():  # someone else's parse is running and nobody may wait
        response = upload(client, png_bytes())
    assert_json_error(response, 503, "busy")
    assert response.headers["retry-after"]
    assert upload(client, png_bytes()).status_code == 200  # and once it is done, the next goes through


def test_parses_run_one_at_a_time(tmp_path, web_parser) -> None:
    parser = web_parser.get()
    running, most = 0, 0
    lock = threading.Lock()

    class CountingParser:
        untrained = parser.untrained
        model_digest = parser.model_digest

        def parse(self, rgb):
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                return parser.parse(rgb)
            finally:
                with lock:
                    running -= 1

    provider = ParserProvider.of(CountingParser(), max_waiting=4)  # type: ignore[arg-type]
    with LiveServer(make_app(provider, tmp_path)) as server:
        def send() -> int:
            return httpx2.post(f"{server.url}/api/predict", files={"image": ("p.png", png_bytes())},
                               timeout=60).status_code

        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(send())) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
    assert results == [200, 200, 200]
    assert most == 1


def test_model_that_cannot_load_is_503_and_not_ready(tmp_path) -> None:
    def broken():
        raise FileNotFoundError("no configuration.json in /nowhere")

    provider = ParserProvider(broken)
    client = TestClient(make_app(provider, tmp_path))
    body = assert_json_error(upload(client, png_bytes()), 503, "model_unavailable")
    assert "configuration.json" in body["message"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["model"]["ok"] is False
    assert client.get("/healthz").status_code == 200  # alive all the same


def test_unknown_path_and_method_are_json_errors(client) -> None:
    assert_json_error(client.get("/api/nothing"), 404, "not_found")
    assert_json_error(client.get("/api/predict"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- jobs


def test_jobs_list_filter_and_paging(client, job_store) -> None:
    ids = fill_job_store(job_store)
    page = client.get("/api/v1/jobs").json()
    assert [j["id"] for j in page["jobs"]] == sorted(ids.values(), reverse=True)  # newest first
    assert page["total"] == 3
    assert page["counts"] == {"received": 1, "parsing": 0, "encoding": 0, "dispatching": 0, "done": 1, "failed": 1}
    failed = client.get("/api/v1/jobs", params={"state": "failed"}).json()
    assert [j["id"] for j in failed["jobs"]] == [ids["failed"]] and failed["total"] == 1
    job = failed["jobs"][0]
    assert job["calling_ae"] == "MODALITY" and job["reason"].startswith("pixel data truncated")
    both = client.get("/api/v1/jobs", params=[("state", "failed"), ("state", "done")]).json()
    assert {j["id"] for j in both["jobs"]} == {ids["failed"], ids["done"]} and both["total"] == 2
    second = client.get("/api/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert [j["id"] for j in second["jobs"]] == [ids["failed"]]
    assert (second["limit"], second["offset"], second["total"]) == (1, 1, 3)
    assert client.get("/api/v1/jobs", params={"offset": 5}).json()["jobs"] == []


@pytest.mark.parametrize("query", ["state=nonsense", "limit=0", "limit=501", "offset=-1", "limit=abc"])
def test_jobs_list_bad_parameters_are_400(client, query: str) -> None:
    assert_json_error(client.get(f"/api/v1/jobs?{query}"), 400, "bad_request")


def test_job_detail_has_its_history(client, job_store) -> None:
    ids = fill_job_store(job_store)
    job = client.get(f"/api/v1/jobs/{ids['done']}").json()
    assert job["state"] == "done"
    assert [(e["from_state"], e["to_state"]) for e in job["history"]] == [
        (None, "received"), ("received", "parsing"), ("parsing", "done")]
    assert_json_error(client.get("/api/v1/jobs/999"), 404, "not_found")
    for bad in ("0", "-3", "abc", str(2**64)):
        assert_json_error(client.get(f"/api/v1/jobs/{bad}"), 400, "bad_request")


def test_retry_reopens_a_failed_job_only(client, job_store) -> None:
    ids = fill_job_store(job_store)
    response = client.post(f"/api/v1/jobs/{ids['failed']}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "received"  # no results yet: processed again
    assert job_store.get(ids["failed"]).state == JobState.RECEIVED
    assert job_store.history(ids["failed"])[-1].reason == "retried from the web UI"
    body = assert_json_error(client.post(f"/api/v1/jobs/{ids['failed']}/retry"), 409, "conflict")
    assert "only failed jobs" in body["message"]
    assert_json_error(client.post("/api/v1/jobs/424242/retry"), 404, "not_found")


def test_jobs_without_a_job_store_are_503(web_parser, tmp_path) -> None:
    client = TestClient(make_app(web_parser, tmp_path))
    assert_json_error(client.get("/api/v1/jobs"), 503, "unavailable")


# --------------------------------------------------------------------------- health


def test_healthz_and_readyz(client) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True
    assert set(body["checks"]) == {"model", "disk_space", "job_store"}
    assert all(c["ok"] for c in body["checks"].values())


def test_readyz_fails_on_low_disk_and_on_a_broken_job_store(web_parser, tmp_path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.close()  # a store that no longer answers
    readiness = Readiness({
        "disk_space": disk_space_check(tmp_path, 10**18),
        "job_store": job_store_check(store, tmp_path),
        "ok": lambda: CheckResult(True, "fine"),
    })
    from dicom_node.web.app import create_app

    client = TestClient(create_app(web_parser, None, readiness, NodeMetrics(), HttpSettings()))
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["disk_space"]["ok"] is False and "MB free" in checks["disk_space"]["detail"]
    assert checks["job_store"]["ok"] is False and "closed" in checks["job_store"]["detail"]
    assert checks["ok"] == {"ok": True, "detail": "fine"}


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("address,loopback", [("127.0.0.1", True), ("127.0.0.9", True), ("::1", True),
                                              ("localhost", True), ("0.0.0.0", False), ("::", False),
                                              ("192.168.1.20", False), ("node.hospital.example", False)])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_binding_off_loopback_needs_a_token() -> None:
    with pytest.raises(ValidationError, match="http.token is required"):
        HttpSettings(bind_address="0.0.0.0")
    with pytest.raises(ValidationError, match="at least 16"):
        HttpSettings(bind_address="0.0.0.0", token="short")
    assert HttpSettings(bind_address="0.0.0.0", token=TOKEN).auth_required
    assert not HttpSettings().auth_required


def test_token_required_for_everything_but_healthz_when_not_on_loopback(web_parser, tmp_path, job_store) -> None:
    settings = HttpSettings(bind_address="0.0.0.0", token=TOKEN)
    client = TestClient(make_app(web_parser, tmp_path / "data", job_store, settings=settings), follow_redirects=False)
    assert client.get("/healthz").status_code == 200
    for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/api/v1/jobs"),
                         ("POST", "/api/v1/jobs/1/retry"), ("POST", "/api/predict"), ("GET", "/static/app.js")):
        response = client.request(method, path)
        assert_json_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        wrong = client.request(method, path, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401
    # a browser is sent to the sign-in page
    page = client.get("/dashboard")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/dashboard"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/v1/jobs", headers=auth).status_code == 200
    assert client.get("/metrics", headers=auth).status_code == 200
    assert upload(client, png_bytes(), headers=auth).status_code == 200


def test_browser_sign_in_sets_a_strict_http_only_cookie(web_parser, tmp_path) -> None:
    settings = HttpSettings(bind_address="0.0.0.0", token=TOKEN)
    client = TestClient(make_app(web_parser, tmp_path, settings=settings), follow_redirects=False)
    assert client.get("/login").status_code == 200
    refused = client.post("/login", data={"token": "wrong", "next": "/dashboard"})
    assert refused.status_code == 303 and refused.headers["location"].startswith("/login?failed=1")
    assert "set-cookie" not in refused.headers
    offsite = client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"})
    assert offsite.headers["location"] == "/"
    signed_in = client.post("/login", data={"token": TOKEN, "next": "/dashboard"})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/dashboard").status_code == 200  # the client keeps the cookie
    assert client.get("/api/v1/info").status_code == 200


def test_security_headers_on_pages_and_refusals(web_parser, tmp_path) -> None:
    settings = HttpSettings(bind_address="0.0.0.0", token=TOKEN)
    client = TestClient(make_app(web_parser, tmp_path, settings=settings), follow_redirects=False)
    for response in (client.get("/login"), client.get("/api/v1/jobs"), client.get("/healthz")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "script-src 'self'" in response.headers["content-security-policy"]
    assert client.get("/static/login.js").status_code == 200  # the sign-in page's script is public


def test_loopback_needs_no_token(client) -> None:
    assert client.get("/api/v1/info").status_code == 200
    assert client.get("/login", follow_redirects=False).headers["location"] == "/"


# --------------------------------------------------------------------------- metrics


def test_metrics_parse_and_move_with_api_photos(client, job_store) -> None:
    before = metric_samples(client.get("/metrics").text)
    assert upload(client, png_bytes()).status_code == 200
    assert upload(client, b"not a photo").status_code == 415
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = metric_samples(response.text)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("dicom_node_instances_received_total", source=SOURCE_API) == 1
    assert moved("dicom_node_instances_rejected_total", source=SOURCE_API, reason="unsupported_media_type") == 1
    assert moved("dicom_node_parse_seconds_count", source=SOURCE_API) == 1
    assert moved("dicom_node_parse_seconds_sum", source=SOURCE_API) > 0


def test_metrics_follow_a_dicom_photo_through_the_node(web_parser, tmp_path, job_store) -> None:
    """What the node reports while a photo is received, parsed, and dispatched, as /metrics shows it."""
    metrics = NodeMetrics(job_store=job_store)
    open_associations = [0]
    metrics.count_open_associations(lambda: open_associations[0])
    client = TestClient(make_app(web_parser, tmp_path / "data", job_store, metrics=metrics))

    def scrape() -> dict:
        return metric_samples(client.get("/metrics").text)

    start = scrape()
    assert sample(start, "dicom_node_jobs", state="received") == 0

    # intake: an association opens, one photo is acknowledged, one refused
    open_associations[0] = 1
    job, _ = job_store.add_received(new_job("1.2.3.9"))
    metrics.received(SOURCE_DICOM)
    metrics.rejected("calling_ae_not_recognised")
    received = scrape()
    assert sample(received, "dicom_node_open_associations") == 1
    assert sample(received, "dicom_node_instances_received_total", source="dicom") == 1
    assert sample(received, "dicom_node_instances_rejected_total", source="dicom",
                  reason="calling_ae_not_recognised") == 1
    assert sample(received, "dicom_node_jobs", state="received") == 1
    assert sample(received, "dicom_node_queue_depth", stage="processing") == 1

    # a worker parses and encodes it
    open_associations[0] = 0
    job_store.claim_for_processing("n/worker-0/")
    job_store.advance(job.id, "n/worker-0/", JobState.ENCODING)
    job_store.finish_encoding(job.id, "n/worker-0/", [], parse_s=0.8)
    metrics.observe_parse(0.8, SOURCE_DICOM)
    parsed = scrape()
    assert sample(parsed, "dicom_node_parse_seconds_count", source="dicom") == 1
    assert sample(parsed, "dicom_node_parse_seconds_bucket", source="dicom", le="1.0") == 1
    assert sample(parsed, "dicom_node_queue_depth", stage="processing") == 0
    assert sample(parsed, "dicom_node_queue_depth", stage="dispatch") == 1
    assert sample(parsed, "dicom_node_open_associations") == 0

    # dispatch: the first attempt fails, the second delivers
    claimed = job_store.claim_for_dispatch("n/dispatch-0/", 60)
    metrics.dispatch_attempt("pacs")
    metrics.dispatch_failure("pacs")
    job_store.dispatch_failed(claimed.id, "n/dispatch-0/", "association rejected", retry_at=0.0)
    claimed = job_store.claim_for_dispatch("n/dispatch-0/", 60)
    metrics.dispatch_attempt("pacs")
    job_store.dispatch_succeeded(claimed.id, "n/dispatch-0/")
    done = scrape()
    assert sample(done, "dicom_node_dispatch_attempts_total", destination="pacs") == 2
    assert sample(done, "dicom_node_dispatch_failures_total", destination="pacs") == 1
    assert sample(done, "dicom_node_jobs", state="done") == 1
    assert sample(done, "dicom_node_queue_depth", stage="dispatch") == 0


def test_metrics_survive_a_broken_job_store(tmp_path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.close()
    samples = metric_samples(NodeMetrics(job_store=store).render().decode())
    assert not any(name == "dicom_node_jobs" for name, _ in samples)
    assert ("dicom_node_instances_received_total", (("source", "dicom"),)) in samples


# --------------------------------------------------------------------------- the server and the pages


def test_http_server_starts_serves_and_stops(web_parser, tmp_path) -> None:
    server = HttpServer(make_app(web_parser, tmp_path), "127.0.0.1", 0)
    server.start()
    port = server.port
    try:
        assert port > 0 and server.running
        assert httpx2.get(f"{server.url}/healthz", timeout=10).json() == {"status": "alive"}
        busy = HttpServer(make_app(web_parser, tmp_path), "127.0.0.1", server.port)
        with pytest.raises(OSError):
            busy.start()
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_pages_and_openapi_are_served(client) -> None:
    for path in ("/", "/dashboard"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    assert {"/api/predict", "/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/retry", "/healthz",
            "/readyz", "/metrics"} <= set(schema["paths"])
    for path_item in schema["paths"].values():
        for operation in path_item.values():
            # validation errors are documented as 400; a 422 is only the unreadable lesion mask's ErrorBody
            assert "HTTPValidationError" not in repr(operation["responses"].get("422", ""))
            assert "400" in operation["responses"] or not (operation.get("parameters") or
                                                           operation.get("requestBody"))
