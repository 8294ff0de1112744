"""Lesion masks on the web side: /api/predict with a mask, the kept parsing's lesion endpoint, its
report and SR, and the parse page's painting canvas in real Chromium.

The expectations are not the code under test's: region and lesion pixels are counted here from the
label map the API returned (its colour PNG read back through /api/v1/classes) and the mask this
test sent; the page's table and %TBSA are compared with the API's answer for the very mask the page
sent.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from dicom_node.config import HttpSettings
from dicom_node.parse.report import VIEW_UNKNOWN_WARNING, parse_report
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.web.lesion import KEPT_PARSING_TTL_S, MAX_KEPT_PARSINGS, ParsingStore
from dicom_node.web.parsing import ParserProvider
from tests.photo_factory import synthetic_rgb
from tests.test_web_browser import CHROMIUM, CHROMIUM_FLAGS, UI_TIMEOUT_MS, screenshot
from tests.web_fixtures import PHOTO_HW, LiveServer, decode_png, dicom_bytes, make_app, photo_rgb, png_bytes

BROWSER_PHOTO_HW = (240, 320)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(web_parser: ParserProvider, tmp_path: Path, job_store: SqliteJobStore) -> TestClient:
    return TestClient(make_app(web_parser, tmp_path / "data", job_store))


def mask_png(mask: np.ndarray, mode: str = "L") -> bytes:
    """A boolean mask as PNG: grey 255/0, or RGBA like a canvas export (painted red, the rest transparent)."""
    if mode == "RGBA":
        pixels = np.zeros((*mask.shape, 4), np.uint8)
        pixels[mask] = (255, 0, 90, 255)
    else:
        pixels = np.where(mask, 255, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def box_mask(hw: tuple[int, int] = PHOTO_HW) -> np.ndarray:
    h, w = hw
    mask = np.zeros(hw, bool)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    mask[:, :5] = True  # a band along the edge too: it may fall on background
    return mask


def predict(client: TestClient, photo: bytes, mask: bytes | None = None, name: str = "photo.png",
            query: str = "") -> dict[str, Any]:
    files: dict[str, tuple[str, bytes, str]] = {"image": (name, photo, "application/octet-stream")}
    if mask is not None:
        files["lesion_mask"] = ("mask.png", mask, "image/png")
    response = client.post(f"/api/predict?format=json{query}", files=files)
    assert response.status_code == 200, response.text
    return response.json()


def label_map_of(answer: dict[str, Any], classes: list[dict[str, Any]]) -> np.ndarray:
    """The label map, read back from the colour PNG through the class colours /api/v1/classes lists."""
    colour = decode_png(base64.b64decode(answer["images"]["color_png"]))
    label_map = np.full(colour.shape[:2], -1, np.int16)
    for cls in classes:
        label_map[np.all(colour == np.array(cls["color"], np.uint8), axis=2)] = cls["index"]
    assert (label_map >= 0).all(), "a colour that is no class colour"
    return label_map


def expected_lesion(label_map: np.ndarray, mask: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for c in sorted(int(v) for v in np.unique(label_map) if v != 0):
        region = int(np.count_nonzero(label_map == c))
        hit = int(np.count_nonzero((label_map == c) & mask))
        rows.append({"class_index": c, "region_pixels": region, "lesion_pixels": hit,
                     "lesion_percent": pytest.approx(100.0 * hit / region)})
    return rows


def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("class_index", "region_pixels", "lesion_pixels", "lesion_percent")} for r in rows]


# --------------------------------------------------------------------------- API


def test_predict_with_a_mask_counts_lesion_pixels_per_region(client: TestClient,
                                                              web_parser: ParserProvider) -> None:
    mask = box_mask()
    answer = predict(client, png_bytes(), mask_png(mask))
    label_map = label_map_of(answer, client.get("/api/v1/classes").json())
    report, metadata = answer["report"], answer["metadata"]
    assert strip(report["lesion"]) == expected_lesion(label_map, mask)
    assert metadata["lesion_mask"] == {"width": PHOTO_HW[1], "height": PHOTO_HW[0], "resampled": False,
                                       "resampled_to": None, "resampling": None,
                                       "lesion_pixels": int(mask.sum())}
    tbsa = report["tbsa"]
    assert tbsa["method"] == "lund-browder" and tbsa["view"] == "anterior"
    assert "not for diagnosis" in tbsa["note"]
    assert tbsa["warnings"][0] == VIEW_UNKNOWN_WARNING  # a PNG says nothing of its view
    assert 0.0 <= tbsa["percent"] <= tbsa["visible_percent"] <= 100.0

    # what `dicom-node parse` writes for the same photo and mask
    cli = json.loads(json.dumps(parse_report(web_parser.get().parse(photo_rgb()), "photo.png", mask)))
    assert (report["lesion"], report["tbsa"]) == (cli["lesion"], cli["tbsa"])

    # the kept parsing gives the same figures for the same mask, without the network
    parsing = metadata["parsing"]
    assert len(parsing["id"]) >= 32 and parsing["sr_available"] is False
    assert 0 < parsing["expires_in_s"] <= KEPT_PARSING_TTL_S
    again = client.post(f"/api/v1/parsings/{parsing['id']}/lesion", content=mask_png(mask, "RGBA"),
                        headers={"Content-Type": "image/png"})
    assert again.status_code == 200, again.text
    assert again.json()["lesion"] == report["lesion"]
    assert again.json()["tbsa"] == tbsa


def test_a_mask_of_another_size_is_resampled_nearest_neighbour(client: TestClient) -> None:
    h, w = PHOTO_HW
    small = np.zeros((h // 2, w // 2), bool)
    small[10:40, 20:50] = True
    small[0, 0] = True
    answer = predict(client, png_bytes(), mask_png(small), query="&view=posterior&age_years=3")
    full = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # exact 2x nearest neighbour
    label_map = label_map_of(answer, client.get("/api/v1/classes").json())
    assert strip(answer["report"]["lesion"]) == expected_lesion(label_map, full)
    assert answer["metadata"]["lesion_mask"] == {
        "width": w // 2, "height": h // 2, "resampled": True, "resampled_to": {"width": w, "height": h},
        "resampling": "nearest-neighbour", "lesion_pixels": int(full.sum())}
    tbsa = answer["report"]["tbsa"]
    assert (tbsa["view"], tbsa["age_group"], tbsa["age_years"]) == ("posterior", "1-4", 3.0)

    # the lesion endpoint takes the multipart form too, and other sizes likewise
    parsing_id = answer["metadata"]["parsing"]["id"]
    form = client.post(f"/api/v1/parsings/{parsing_id}/lesion?view=posterior&age_years=3",
                       files={"lesion_mask": ("m.png", mask_png(small), "image/png")})
    assert form.status_code == 200, form.text
    assert form.json()["lesion"] == answer["report"]["lesion"]
    assert form.json()["lesion_mask"]["resampled"] is True


def test_report_json_and_the_sr_carry_the_labox_mask(client: TestClient) -> None:
    answer = predict(client, dicom_bytes(), name="photo.dcm")
    parsing = answer["metadata"]["parsing"]
    assert parsing["sr_available"] is True
    base = client.get(f"/api/v1/parsings/{parsing['id']}/report.json")
    assert base.status_code == 200
    assert base.headers["cache-control"] == "no-store"
    assert "lesion" not in base.json() and base.json()["regions"] == answer["report"]["regions"]

    mask = box_mask()
    posted = client.post(f"/api/v1/parsings/{parsing['id']}/lesion?tbsa_method=rule-of-nines",
                         content=mask_png(mask), headers={"Content-Type": "image/png"}).json()
    report = client.get(f"/api/v1/parsings/{parsing['id']}/report.json").json()
    assert report["lesion"] == posted["lesion"] and report["tbsa"] == posted["tbsa"]
    assert report["tbsa"]["method"] == "rule-of-nines"
    label_map = label_map_of(answer, client.get("/api/v1/classes").json())
    assert strip(report["lesion"]) == expected_lesion(label_map, mask)

    sr = client.get(f"/api/v1/parsings/{parsing['id']}/sr.dcm")
    assert sr.status_code == 200, sr.text
    assert sr.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(sr.content))
    assert ds.Modality == "SR"
    text = repr(ds)
    # the lesion's figures for a region it covers are in the SR's content
    hit = next(r for r in posted["lesion"] if r["lesion_pixels"] > 0)
    assert hit["label"] in text

    png = predict(client, png_bytes())["metadata"]["parsing"]["id"]
    refused = client.get(f"/api/v1/parsings/{png}/sr.dcm")
    assert refused.status_code == 409 and "only for DICOM uploads" in refused.json()["message"]


def test_unknown_expired_and_pushed_out_parsings_are_404(web_parser: ParserProvider, tmp_path: Path) -> None:
    app = make_app(web_parser, tmp_path / "data")
    clock = FakeClock()
    app.state.web.parsings = ParsingStore(clock=clock)
    client = TestClient(app)
    body: dict[str, Any] = {"content": mask_png(box_mask()), "headers": {"Content-Type": "image/png"}}
    unknown = client.post("/api/v1/parsings/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/lesion", **body)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    assert client.post("/api/v1/parsings/short/lesion", **body).status_code == 400

    parsing_id = predict(client, png_bytes())["metadata"]["parsing"]["id"]
    assert client.post(f"/api/v1/parsings/{parsing_id}/lesion", **body).status_code == 200
    clock.now += KEPT_PARSING_TTL_S - 1
    assert client.get(f"/api/v1/parsings/{parsing_id}/report.json").status_code == 200
    clock.now += 1
    for response in (client.post(f"/api/v1/parsings/{parsing_id}/lesion", **body),
                     client.get(f"/api/v1/parsings/{parsing_id}/report.json"),
                     client.get(f"/api/v1/parsings/{parsing_id}/sr.dcm")):
        assert response.status_code == 404, response.text
    assert len(app.state.web.parsings) == 0  # dropped, not just hidden


def test_the_store_keeps_the_newest_parsings_only() -> None:
    from dicom_node.decode.photo import Photo
    from dicom_node.parse.result import result_from_label_map

    store = ParsingStore(max_count=3)
    result = result_from_label_map(np.ones((4, 4), np.uint8))
    photo = Photo(rgb=np.zeros((4, 4, 3), np.uint8), dataset=None, source="x.png")
    ids = [store.keep(result, photo, {}).parsing_id for _ in range(5)]
    assert len(set(ids)) == 5
    assert [store.get(i) is not None for i in ids] == [False, False, True, True, True]
    kept = store.get(ids[-1])
    assert kept is not None and kept.photo_rgb is None and kept.result.parts == []  # a PNG's: label map only
    assert MAX_KEPT_PARSINGS == 20


def test_bad_masks_are_refused_before_any_parse(web_parser: ParserProvider, tmp_path: Path) -> None:
    client = TestClient(make_app(web_parser, tmp_path / "data", settings=HttpSettings(max_pixels=30_000)))
    files = {"image": ("p.png", png_bytes(), "image/png"), "lesion_mask": ("m.png", b"not an image", "image/png")}
    refused = client.post("/api/predict?format=json", files=files)
    assert refused.status_code == 422 and refused.json()["error"] == "bad_mask"
    assert len(client.app.state.web.parsings) == 0  # type: ignore[attr-defined]

    parsing_id = predict(client, png_bytes())["metadata"]["parsing"]["id"]
    url = f"/api/v1/parsings/{parsing_id}/lesion"
    huge = client.post(url, content=mask_png(np.zeros((200, 200), bool)), headers={"Content-Type": "image/png"})
    assert huge.status_code == 413 and huge.json()["error"] == "too_many_pixels"
    for content in (b"", b"\x89PNG\r\n\x1a\ntruncated"):
        bad = client.post(url, content=content, headers={"Content-Type": "image/png"})
        assert bad.status_code == 422 and bad.json()["error"] == "bad_mask", bad.text
    assert client.post(url + "?view=sideways", content=mask_png(box_mask())).status_code == 400
    assert client.post(url, files={"other": ("m.png", b"x", "image/png")}).status_code == 400


def test_recomputing_a_1024x768_parsing_takes_milliseconds(client: TestClient) -> None:
    answer = predict(client, png_bytes(synthetic_rgb(768, 1024)))
    parsing_id = answer["metadata"]["parsing"]["id"]
    mask = box_mask((768, 1024))
    body = mask_png(mask)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        response = client.post(f"/api/v1/parsings/{parsing_id}/lesion", content=body,
                               headers={"Content-Type": "image/png"})
        times.append(time.perf_counter() - started)
        assert response.status_code == 200
    compute_s = response.json()["compute_s"]
    print(f"1024x768 lesion recompute: request {min(times) * 1000:.1f} ms (best of 5), "
          f"server-side figures {compute_s * 1000:.1f} ms; parse was {answer['metadata']['inference_s']:.2f} s")
    assert min(times) < 0.5


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def drag(page: Page, points: list[tuple[float, float]]) -> None:
    """One stroke with the mouse through ``points`` (fractions of the canvas's shown size)."""
    box = page.locator("#lesion-canvas").bounding_box()
    assert box is not None and box["width"] > 100
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()


def check_page_matches_api(page: Page, answer: dict[str, Any]) -> None:
    hit = [r for r in answer["lesion"] if r["lesion_pixels"] > 0]
    rows = page.locator("#lesion-body tr")
    expect(rows).to_have_count(max(1, len(hit)))
    for i, region in enumerate(hit):
        cells = rows.nth(i).locator("td")
        expect(cells.nth(1)).to_have_text(region["label"])
        expect(cells.nth(2)).to_have_text(f"{region['region_pixels']:,}")
        expect(cells.nth(3)).to_have_text(f"{region['lesion_pixels']:,}")
        expect(cells.nth(4)).to_have_text(f"{region['lesion_percent']:.2f} %")
    tbsa = answer["tbsa"]
    expect(page.locator("#tbsa-percent")).to_have_text(f"{tbsa['percent']:.2f} %")
    expect(page.locator("#tbsa-visible")).to_contain_text(f"{tbsa['visible_percent']:.1f} %")
    expect(page.locator("#tbsa-warnings li")).to_have_count(len(tbsa["warnings"]))
    expect(page.locator("#tbsa-note")).to_contain_text("not for diagnosis")


def test_painting_on_the_parse_page_updates_table_and_tbsa(web_parser: ParserProvider, page: Page,
                                                          tmp_path: Path) -> None:
    photo = tmp_path / "burn.png"
    photo.write_bytes(png_bytes(synthetic_rgb(*BROWSER_PHOTO_HW)))
    with LiveServer(make_app(web_parser, tmp_path / "data")) as server:
        sent: list[tuple[str, bytes]] = []
        page.on("request", lambda r: sent.append((r.url, r.post_data_buffer or b""))
                if r.method == "POST" and "/lesion" in r.url else None)
        page.goto(server.url + "/")
        page.set_input_files("#file-input", str(photo))
        expect(page.locator("#results")).to_have_attribute("data-ready", "true")
        expect(page.locator("#lesion")).to_be_visible()
        expect(page.locator("#download-sr")).to_be_hidden()  # a PNG: no SR
        expect(page.locator("#sr-hint")).to_be_visible()
        page.wait_for_function("() => document.querySelector('#original-img').naturalWidth === 320")
        assert page.eval_on_selector("#lesion-canvas", "c => [c.width, c.height]") == [320, 240]

        page.select_option("#lesion-view", "posterior")
        page.fill("#lesion-age", "40")
        page.locator("#brush-size").fill("24")
        drag(page, [(0.2, 0.3), (0.5, 0.35), (0.7, 0.3)])
        drag(page, [(0.45, 0.6), (0.5, 0.9)])
        lesion = page.locator("#lesion")
        expect(lesion).to_have_attribute("data-shown", "2")
        expect(lesion).to_have_attribute("data-pending", "false")
        screenshot(page, "web-lesion-painted")

        # the mask the page sent last: the photo's size, lesion where the mouse went and nowhere near the corners
        url, body = sent[-1]
        assert "view=posterior" in url and "age_years=40" in url
        mask = decode_png(body)
        assert mask.shape[:2] == BROWSER_PHOTO_HW
        lesion_px = np.any(mask[..., :3] != 0, axis=2) if mask.ndim == 3 else mask != 0
        assert lesion_px[int(0.35 * 240) - 2: int(0.35 * 240) + 3, int(0.5 * 320)].any()
        assert lesion_px[int(0.75 * 240), int(0.5 * 320)]
        assert not lesion_px[:20, :20].any() and not lesion_px[-20:, -20:].any()

        # ... and what the API answers for that mask is what the page shows
        parsing_id = url.split("/api/v1/parsings/")[1].split("/")[0]
        answer = httpx2.post(f"{server.url}/api/v1/parsings/{parsing_id}/lesion?view=posterior&age_years=40&"
                             "tbsa_method=lund-browder", content=body, headers={"Content-Type": "image/png"}).json()
        assert answer["lesion_mask"]["lesion_pixels"] == int(lesion_px.sum())
        assert answer["tbsa"]["view"] == "posterior" and answer["tbsa"]["age_group"] == "adult"
        check_page_matches_api(page, answer)

        # undo takes the second stroke back; the figures follow
        page.click("#undo-stroke")
        expect(lesion).to_have_attribute("data-shown", "3")
        undone = decode_png(sent[-1][1])
        undone_px = np.any(undone[..., :3] != 0, axis=2) if undone.ndim == 3 else undone != 0
        assert not undone_px[int(0.75 * 240), int(0.5 * 320)] and undone_px.sum() < lesion_px.sum()
        check_page_matches_api(page, httpx2.post(sent[-1][0], content=sent[-1][1],
                                                 headers={"Content-Type": "image/png"}).json())

        # the eraser removes paint; the JSON download holds the figures shown
        page.check("#tool-erase")
        drag(page, [(0.1, 0.3), (0.9, 0.3)])
        expect(lesion).to_have_attribute("data-shown", "4")
        erased = httpx2.post(sent[-1][0], content=sent[-1][1], headers={"Content-Type": "image/png"}).json()
        assert erased["lesion_mask"]["lesion_pixels"] < undone_px.sum()
        check_page_matches_api(page, erased)
        with page.expect_download() as download_info:
            page.click("#download-json")
        downloaded = json.loads(Path(download_info.value.path()).read_text())
        assert download_info.value.suggested_filename == "burn.json"
        assert downloaded["lesion"] == erased["lesion"] and downloaded["tbsa"] == erased["tbsa"]

        # clear: nothing painted, 0 %
        page.click("#clear-lesion")
        expect(lesion).to_have_attribute("data-shown", "5")
        expect(page.locator("#lesion-body")).to_have_text("No lesion painted.")
        expect(page.locator("#tbsa-percent")).to_have_text("0.00 %")
        expect(page.locator("#undo-stroke")).to_be_disabled()


def test_a_dicom_upload_offers_the_sr_and_touch_paints(web_parser: ParserProvider, browser: Browser,
                                                      tmp_path: Path) -> None:
    photo = tmp_path / "burn.dcm"
    photo.write_bytes(dicom_bytes(synthetic_rgb(*BROWSER_PHOTO_HW)))
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, has_touch=True, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        with LiveServer(make_app(web_parser, tmp_path / "data")) as server:
            page.goto(server.url + "/")
            page.set_input_files("#file-input", str(photo))
            expect(page.locator("#results")).to_have_attribute("data-ready", "true")
            expect(page.locator("#download-sr")).to_be_visible()
            page.wait_for_function("() => document.querySelector('#original-img').naturalWidth === 320")
            box = page.locator("#lesion-canvas").bounding_box()
            assert box is not None
            page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            expect(page.locator("#lesion")).to_have_attribute("data-shown", "1")
            expect(page.locator("#tbsa-percent")).not_to_have_text("–")
            with page.expect_download() as download_info:
                page.click("#download-sr")
            assert download_info.value.suggested_filename == "burn_sr.dcm"
            ds = pydicom.dcmread(download_info.value.path())
            assert ds.Modality == "SR"
    finally:
        context.close()


# --------------------------------------------------------------------------- fuzz on a live parsing


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_mask_or_parameter_makes_a_kept_parsing_fail(web_parser: ParserProvider, tmp_path: Path,
                                                        mode: str) -> None:
    """tests/test_web_fuzz.py only meets unknown ids (404); here every generated request names a real one."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    with LiveServer(make_app(web_parser, tmp_path / "data")) as server:
        parsing_id = httpx2.post(f"{server.url}/api/predict?format=json",
                                 files={"image": ("p.dcm", dicom_bytes(), "application/dicom")},
                                 timeout=60).json()["metadata"]["parsing"]["id"]
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        statuses: set[int] = set()
        for result in schema.get_all_operations():
            operation = result.ok()
            if "/api/v1/parsings/" not in operation.path:
                continue

            @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
            @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def call(case: Any) -> None:
                case.path_parameters = {"parsing_id": parsing_id}
                response = case.call_and_validate(timeout=60, checks=[
                    not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance])
                statuses.add(response.status_code)

            call()
    assert 404 not in statuses and statuses, statuses
    print(mode, sorted(statuses))
