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
from pydicom.dataset import Dataset

from dicom_node.config import HttpSettings
from dicom_node.decode.photo import Photo
from dicom_node.parse.report import VIEW_UNKNOWN_WARNING, parse_report
from dicom_node.parse.result import result_from_label_map
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.web.lesion import KEPT_PARSING_TTL_S, MAX_KEPT_PARSINGS, ParsingStore
from dicom_node.web.parsing import ParserProvider
from tests.photo_factory import make_vl_photo, synthetic_rgb
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


# --------------------------------------------------------------------------- one study: front and back

# The chart numbers, as tabulated from Lund and Browder (1944) and Wallace (1951) (dicom_node.parse.tbsa's
# sources), summed here by hand into the regions the node reports. The trunk region holds the neck (1 per side),
# the trunk (13 per side), the genitalia (1, anterior) and both buttocks (2 x 2.5, posterior); the rule of nines'
# trunk is 18 per side with the perineum (1) anterior. Head: half of A per side (adult 3.5, age 5-9 6.5); rule of
# nines 4.5 per side.
LB_TRUNK = {"anterior": 1 + 13 + 1, "posterior": 1 + 13 + 2.5 + 2.5}
LB_HEAD_5_9 = 6.5
NINES_TRUNK = {"anterior": 18 + 1, "posterior": 18}
NINES_HEAD = 4.5
HAT, HAIR, TORSO_SKIN, SCARF, FACE = 1, 2, 10, 11, 13  # CIHP class indices
TRUNK_ONLY_COVERS = (SCARF,)  # garments that can cover the trunk and nothing else
TRUNK_SHARED_COVERS = (5, 6, 7)  # UpperClothes, Dress, Coat: shared with limbs (the nearest skin decides)
STUDY_PATH = "/api/v1/tbsa"


def view_code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def keep_label_map(client: TestClient, label_map: np.ndarray, source: str, **tags: object) -> str:
    """A parsing of a label map built by the test, kept as /api/predict keeps one (a DICOM photo with ``tags``,
    or with no tags a PNG); the untrained model's label maps are not ones whose figures can be worked out by hand."""
    h, w = label_map.shape
    ds = make_vl_photo(np.zeros((h, w, 3), np.uint8), **tags) if tags else None
    photo = Photo(rgb=np.zeros((h, w, 3), np.uint8), dataset=ds, source=source)
    store: ParsingStore = client.app.state.web.parsings  # type: ignore[attr-defined]
    return store.keep(result_from_label_map(label_map), photo, {}).parsing_id


def send_mask(client: TestClient, parsing_id: str, mask: np.ndarray, query: str = "") -> dict[str, Any]:
    response = client.post(f"/api/v1/parsings/{parsing_id}/lesion{query}", content=mask_png(mask),
                           headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def rows_of(answer: dict[str, Any], region: str) -> dict[str, dict[str, Any]]:
    return {r["view"]: r for r in answer["regions"] if r["region"] == region}


def test_front_and_back_parsings_combine_into_one_study_estimate(client: TestClient) -> None:
    """Two photos parsed by the API, a lesion on each one's torso skin: the study's %TBSA is the sum of the
    chart's anterior and posterior trunk halves times the shares counted here from the returned label maps."""
    classes = client.get("/api/v1/classes").json()
    front_rgb = photo_rgb()
    expected, ids, singles, counted = 0.0, [], [], {}
    for rgb, name, view in ((front_rgb, "front.png", "anterior"),
                            (np.ascontiguousarray(front_rgb[::-1]), "back.png", "posterior")):
        answer = predict(client, png_bytes(rgb), name=name)
        label_map = label_map_of(answer, classes)
        assert not np.isin(label_map, TRUNK_SHARED_COVERS).any(), \
            "the shares below assume no garment shared by trunk and limbs: pick another test photo"
        skin = label_map == TORSO_SKIN
        mask = skin.copy()
        mask[::2] = False  # every other row of the torso skin
        assert 0 < np.count_nonzero(mask) < np.count_nonzero(skin), "the test photo shows too little torso skin"
        if view == "anterior":  # and 5 background pixels: ignored, with a warning
            mask.ravel()[np.flatnonzero(label_map.ravel() == 0)[:5]] = True
        visible_share = skin.sum() / (skin.sum() + np.isin(label_map, TRUNK_ONLY_COVERS).sum())
        lesion_share = np.count_nonzero(mask & skin) / skin.sum()
        counted[view] = (visible_share, lesion_share)
        expected += LB_TRUNK[view] * visible_share * lesion_share
        parsing_id = answer["metadata"]["parsing"]["id"]
        singles.append(send_mask(client, parsing_id, mask, f"?view={view}")["tbsa"])
        ids.append(parsing_id)

    response = client.post(STUDY_PATH, json={"parsings": ids, "age_years": 40})
    assert response.status_code == 200, response.text
    study = response.json()
    assert (study["view"], study["method"], study["age_group"], study["age_years"], study["age_from"]) == \
        ("both", "lund-browder", "adult", 40.0, "request")
    assert study["percent"] == pytest.approx(expected)
    trunk = rows_of(study, "trunk")
    for view, (visible_share, lesion_share) in counted.items():
        assert trunk[view]["chart_percent"] == LB_TRUNK[view]
        assert trunk[view]["visible_share"] == pytest.approx(visible_share)
        assert trunk[view]["lesion_share"] == pytest.approx(lesion_share)
    assert all(r["contribution_percent"] == 0 for r in study["regions"] if r["region"] != "trunk")
    assert len(study["regions"]) == 12  # 6 regions x 2 views
    assert study["photos"] == [
        {"parsing": ids[0], "source": "front.png", "view": "anterior", "view_from": "request"},
        {"parsing": ids[1], "source": "back.png", "view": "posterior", "view_from": "request"}]
    assert "photo 1: 5 lesion pixel(s) not on visible skin were ignored" in study["warnings"]
    assert sum("is a JPEG or PNG" in w for w in study["warnings"]) == 2  # nothing ties a PNG to a patient
    assert not any("age unknown" in w or "photo: the" in w for w in study["warnings"])
    assert "not for diagnosis" in study["note"]
    assert 0 < study["visible_percent"] <= 100
    # each view counts its own half: the study is the sum of the two photos' own estimates, in any order
    assert study["percent"] == pytest.approx(singles[0]["percent"] + singles[1]["percent"])
    again = client.post(STUDY_PATH, json={"parsings": ids[::-1], "age_years": 40}).json()
    assert again["percent"] == pytest.approx(expected)


def study_label_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Front: face under a hat, torso skin under a scarf. Back: hair, bare torso skin. And a lesion on each."""
    front = np.zeros((40, 40), np.uint8)
    front[0:4, 10:30] = HAT  # 80 px covering the head
    front[4:10, 10:30] = FACE  # 120 px
    front[10:30, 10:30] = TORSO_SKIN
    front[10:14, 10:30] = SCARF  # 80 px covering the trunk; 320 px torso skin remain
    back = np.zeros((40, 40), np.uint8)
    back[0:10, 10:30] = HAIR  # 200 px
    back[10:30, 10:30] = TORSO_SKIN  # 400 px
    front_mask = np.zeros((40, 40), bool)
    front_mask[20:25, 10:30] = True  # 100 px on torso skin
    front_mask[4:6, 10:20] = True  # 20 px on the face
    back_mask = np.zeros((40, 40), bool)
    back_mask[10:20, 10:30] = True  # 200 px on torso skin
    return front, back, front_mask, back_mask


def test_a_dicom_study_takes_view_and_age_from_the_headers(client: TestClient) -> None:
    front, back, front_mask, back_mask = study_label_maps()
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    patient = {"PatientID": "BURN-7", "StudyInstanceUID": study_uid, "PatientAge": "007Y"}
    front_id = keep_label_map(client, front, "front.dcm", **patient)
    back_id = keep_label_map(client, back, "back.dcm", **patient,
                             ViewCodeSequence=[view_code("255551008", "Posterior")])
    send_mask(client, front_id, front_mask)
    send_mask(client, back_id, back_mask)

    # shares counted from the label maps: seen skin / (skin + covering garment), lesion / seen skin
    head_seen = np.sum(front == FACE) / np.sum(np.isin(front, (FACE, HAT)))  # 120 / 200
    head_lesion = np.sum(front_mask & (front == FACE)) / np.sum(front == FACE)  # 20 / 120
    trunk_seen = np.sum(front == TORSO_SKIN) / np.sum(np.isin(front, (TORSO_SKIN, SCARF)))  # 320 / 400
    trunk_lesion = np.sum(front_mask & (front == TORSO_SKIN)) / np.sum(front == TORSO_SKIN)  # 100 / 320
    back_lesion = np.sum(back_mask & (back == TORSO_SKIN)) / np.sum(back == TORSO_SKIN)  # 200 / 400, all seen
    expected = (LB_HEAD_5_9 * head_seen * head_lesion + LB_TRUNK["anterior"] * trunk_seen * trunk_lesion
                + LB_TRUNK["posterior"] * 1.0 * back_lesion)
    assert expected == pytest.approx(0.65 + 3.75 + 9.5)
    # seen: the front's head and trunk in part, the back's head (hair) and trunk wholly
    expected_visible = (LB_HEAD_5_9 * head_seen + LB_TRUNK["anterior"] * trunk_seen + LB_HEAD_5_9
                        + LB_TRUNK["posterior"])

    study = client.post(STUDY_PATH, json={"parsings": [front_id, back_id]}).json()
    assert (study["view"], study["age_years"], study["age_group"], study["age_from"]) == ("both", 7.0, "5-9", "dicom")
    assert study["percent"] == pytest.approx(expected)
    assert study["visible_percent"] == pytest.approx(expected_visible)
    assert [(p["view"], p["view_from"]) for p in study["photos"]] == [("anterior", "assumed"), ("posterior", "dicom")]
    assumed = [w for w in study["warnings"] if "view unknown" in w]
    assert len(assumed) == 1 and front_id in assumed[0] and "front.dcm" in assumed[0] and "anterior" in assumed[0]
    assert not any("JPEG or PNG" in w or "age unknown" in w for w in study["warnings"])

    # the request's age and chart win over the header's
    nines = client.post(STUDY_PATH, json={"parsings": [front_id, back_id], "age_years": 40,
                                          "method": "rule-of-nines"}).json()
    assert (nines["method"], nines["age_group"], nines["age_from"]) == ("rule-of-nines", "adult", "request")
    assert nines["percent"] == pytest.approx(NINES_HEAD * head_seen * head_lesion
                                             + NINES_TRUNK["anterior"] * trunk_seen * trunk_lesion
                                             + NINES_TRUNK["posterior"] * back_lesion)

    # the view sent with a parsing's mask wins over the header's: two posterior photos pool by pixels
    send_mask(client, front_id, front_mask, "?view=posterior")
    pooled = client.post(STUDY_PATH, json={"parsings": [front_id, back_id]}).json()
    assert pooled["view"] == "posterior"
    assert [(p["view"], p["view_from"]) for p in pooled["photos"]] == [("posterior", "request"), ("posterior", "dicom")]
    head_skin = np.sum(front == FACE) + np.sum(back == HAIR)  # 320 of 400 seen, 20 with lesion
    trunk_skin = np.sum(front == TORSO_SKIN) + np.sum(back == TORSO_SKIN)  # 720 of 800 seen, 300 with lesion
    assert pooled["percent"] == pytest.approx(
        LB_HEAD_5_9 * head_skin / (head_skin + np.sum(front == HAT)) * 20 / head_skin
        + LB_TRUNK["posterior"] * trunk_skin / (trunk_skin + np.sum(front == SCARF)) * 300 / trunk_skin)
    assert "no anterior photo: the anterior surface was not seen" in pooled["warnings"]

    # photos of another study or patient are refused, naming them
    other_study = keep_label_map(client, back, "other-study.dcm", **{**patient, "StudyInstanceUID": study_uid + ".2"})
    other_patient = keep_label_map(client, back, "other-patient.dcm", **{**patient, "PatientID": "BURN-8"})
    for parsing_id, code, keyword in ((other_study, "different_studies", "StudyInstanceUID"),
                                      (other_patient, "different_patients", "PatientID")):
        send_mask(client, parsing_id, back_mask)
        refused = client.post(STUDY_PATH, json={"parsings": [front_id, back_id, parsing_id]})
        assert refused.status_code == 422, refused.text
        error = refused.json()
        assert error["error"] == code
        assert keyword in error["message"] and "photo 3" in error["message"] and parsing_id in error["message"]


def test_study_requests_that_cannot_be_combined_are_refused(web_parser: ParserProvider, tmp_path: Path) -> None:
    app = make_app(web_parser, tmp_path / "data")
    clock = FakeClock()
    app.state.web.parsings = ParsingStore(clock=clock)
    client = TestClient(app)
    front, back, front_mask, _ = study_label_maps()
    painted = keep_label_map(client, front, "front.png")
    send_mask(client, painted, front_mask)
    unpainted = keep_label_map(client, back, "back.png")

    def refused(body: object, status: int, code: str, *words: str) -> None:
        response = client.post(STUDY_PATH, json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"] == code, response.text
        for word in words:
            assert word in response.json()["message"], response.text

    unknown = "A" * 32
    refused({"parsings": [painted, unknown]}, 404, "not_found", unknown, "photo 2")
    refused({"parsings": [painted, unpainted]}, 409, "no_lesion", unpainted, "back.png", "no lesion")
    refused({"parsings": []}, 422, "bad_parsing_list", "at least one")
    refused({"parsings": [painted, painted]}, 422, "bad_parsing_list", painted, "more than once")
    refused({"parsings": [f"{i:032d}" for i in range(9)]}, 422, "bad_parsing_list", "9", "at most 8")
    refused({"parsings": ["short"]}, 400, "bad_request")
    refused({"parsings": [painted], "age_years": -1}, 400, "bad_request", "age_years")
    refused({"parsings": [painted], "method": "guess"}, 400, "bad_request", "method")
    refused({"parsings": [painted], "view": "anterior"}, 400, "bad_request", "view")  # views go with the masks
    refused({"ids": [painted]}, 400, "bad_request", "parsings")
    assert client.post(STUDY_PATH, content=b"not json", headers={"Content-Type": "application/json"}).status_code == 400

    one = client.post(STUDY_PATH, json={"parsings": [painted]}).json()
    assert one["view"] == "anterior" and one["age_from"] == "unknown"
    assert "patient age unknown: the adult chart was used" in one["warnings"]
    assert "no posterior photo: the posterior surface was not seen" in one["warnings"]
    assert not any("JPEG or PNG" in w for w in one["warnings"])  # one photo: nothing to tie together

    clock.now += KEPT_PARSING_TTL_S
    refused({"parsings": [painted]}, 404, "not_found", painted, "parse the photo again")

    operation = client.get("/openapi.json").json()["paths"][STUDY_PATH]["post"]
    assert "one study" in operation["summary"]
    assert {"200", "400", "404", "409", "422"} <= set(operation["responses"])
    assert "ErrorBody" in json.dumps(operation["responses"]["422"])


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


def upload_and_paint(page: Page, photo: Path, view: str, stroke: list[tuple[float, float]]) -> None:
    before = page.eval_on_selector("#original-img", "img => img.src")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_function("before => { const img = document.querySelector('#original-img'); "
                           "return img.src !== before && img.naturalWidth === 320; }", arg=before)
    expect(page.locator("#lesion")).to_have_attribute("data-shown", "0")
    page.select_option("#lesion-view", view)
    page.locator("#lesion-canvas").scroll_into_view_if_needed()
    drag(page, stroke)
    expect(page.locator("#lesion")).to_have_attribute("data-shown", "1")
    expect(page.locator("#lesion")).to_have_attribute("data-pending", "false")


def test_the_study_panel_combines_front_and_back(web_parser: ParserProvider, page: Page, tmp_path: Path) -> None:
    rgb = synthetic_rgb(*BROWSER_PHOTO_HW)
    front, back = tmp_path / "front.png", tmp_path / "back.png"
    front.write_bytes(png_bytes(rgb))
    back.write_bytes(png_bytes(np.ascontiguousarray(rgb[::-1])))
    with LiveServer(make_app(web_parser, tmp_path / "data")) as server:
        page.goto(server.url + "/")
        expect(page.locator("#study")).to_be_hidden()
        upload_and_paint(page, front, "anterior", [(0.2, 0.4), (0.8, 0.45)])
        study = page.locator("#study")
        expect(study).to_be_visible()
        expect(page.locator("#study-list input")).to_have_count(1)
        upload_and_paint(page, back, "posterior", [(0.3, 0.6), (0.7, 0.5)])
        boxes = page.locator("#study-list input")
        expect(boxes).to_have_count(2)
        expect(page.locator("#study-list")).to_contain_text("front.png")
        expect(page.locator("#study-list")).to_contain_text("posterior")
        expect(page.locator("#study-hint")).to_have_text("2 photos ticked")

        page.click("#study-combine")
        expect(study).to_have_attribute("data-combined", "1")
        screenshot(page, "web-study-tbsa")
        ids = page.eval_on_selector_all("#study-list input", "boxes => boxes.map(b => b.dataset.parsing)")
        answer = httpx2.post(f"{server.url}/api/v1/tbsa", json={"parsings": ids, "method": "lund-browder"}).json()
        assert answer["view"] == "both" and answer["percent"] > 0
        assert [(p["source"], p["view"]) for p in answer["photos"]] == [("front.png", "anterior"),
                                                                        ("back.png", "posterior")]
        expect(page.locator("#study-percent")).to_have_text(f"{answer['percent']:.2f} %")
        expect(page.locator("#study-visible")).to_contain_text(f"{answer['visible_percent']:.1f} %")
        expect(page.locator("#study-detail")).to_contain_text("both views")
        expect(page.locator("#study-warnings li")).to_have_count(len(answer["warnings"]))
        rows = page.locator("#study-body tr")
        expect(rows).to_have_count(len(answer["regions"]))
        for i, region in enumerate(answer["regions"]):
            expect(rows.nth(i).locator("td").nth(5)).to_have_text(f"{region['contribution_percent']:.2f}")
        expect(page.locator("#study-stale")).to_be_hidden()

        # one photo only: its own estimate, which the back photo's figures on the page already show
        boxes.nth(0).uncheck()
        expect(page.locator("#study-hint")).to_have_text("1 photo ticked")
        page.click("#study-combine")
        expect(study).to_have_attribute("data-combined", "2")
        expect(page.locator("#study-percent")).to_have_text(page.locator("#tbsa-percent").inner_text())
        expect(page.locator("#study-detail")).to_contain_text("posterior view")

        # painting again makes the combined figure stale
        page.locator("#lesion-canvas").scroll_into_view_if_needed()
        drag(page, [(0.1, 0.1), (0.9, 0.9)])
        expect(page.locator("#lesion")).to_have_attribute("data-shown", "2")
        expect(page.locator("#study-stale")).to_be_visible()


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
