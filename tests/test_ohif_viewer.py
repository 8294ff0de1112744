"""The node's results in the real OHIF viewer (``@ohif/app`` 3.13.2), proven from screenshot pixels.

One Orthanc 1.10 with its DICOMweb plugin is the PACS: a 640 x 480 VL photo stored there is forwarded
to the node by Orthanc's routing rule (``config/orthanc/route-photos.lua``), and the node delivers its
SEG, SC and SR back over its own STOW-RS destination (``kind = "dicomweb"``). OHIF's ``dist/`` is
served with Orthanc's DICOMweb on one origin (:mod:`tests.ohif_fixtures`) and opened in Debian's
Chromium, WebGL by SwiftShader. Each series is shown at its own URL; the displayed image is found
from the viewport canvas (cornerstone fits the image into it, keeping the aspect ratio), resampled to
the photo's pixel grid and compared with the photo shown alone and with the objects' own content:

* photo and SC: the viewport shows the object's pixels;
* SEG: the viewport is the photo with every segment's Recommended Display CIELab colour blended in
  where the SEG's frames say, and the photo unchanged elsewhere; a black viewport fails;
* SR: the photo with the SR's SCOORD outlines drawn on it (pixels change along them, not elsewhere).

Screenshots: ``test-artifacts/ohif-photo.png``, ``ohif-sc.png``, ``ohif-seg.png``, ``ohif-sr.png``.
"""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFilter
from playwright.sync_api import Browser, Locator, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from tests.node_fixtures import DicomWebOrthanc, NodeProcess, free_port, node_config, wait_until
from tests.ohif_fixtures import OhifServer, OhifUnavailableError, ohif_dist
from tests.photo_factory import make_vl_photo, synthetic_rgb
from tests.web_fixtures import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
# WebGL through SwiftShader: without it OHIF falls back to CPU rendering (and says so in a banner)
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WINDOW = {"width": 1280, "height": 800}
PHOTO_HW = (480, 640)
RESULTS_TIMEOUT_S = 120.0
VIEW_TIMEOUT_S = 40.0  # OHIF shows the first image after about 4-5 s here
TOUR_TIMEOUT_S = 25.0

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SR_CLASSES = {COMPREHENSIVE_SR, "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"}

# Pixel comparisons run on the photo's grid. OHIF writes text over the top and bottom of the viewport
# (date, series description, window, instance number, the SC's cine bar): those rows are left out.
CORE_ROWS = slice(50, 445)
CHANGED = 40.0  # summed |R-R'|+|G-G'|+|B-B'| above which a pixel counts as changed (rendering noise is < 10)
NEAR_BLACK = 24  # all channels below this: a black pixel


# --------------------------------------------------------------------------- the study in Orthanc


@dataclass
class ViewerStudy:
    orthanc: DicomWebOrthanc
    study_uid: str
    photo_rgb: np.ndarray
    objects: dict[str, Dataset]  # "photo", "seg", "sc", "sr" -> the instance as Orthanc holds it

    def series_uid(self, name: str) -> str:
        return str(self.objects[name].SeriesInstanceUID)


def _part10(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _kind(ds: Dataset) -> str:
    sop_class = str(ds.SOPClassUID)
    if sop_class in SR_CLASSES:
        return "sr"
    return {VL_PHOTO: "photo", SEGMENTATION: "seg", SECONDARY_CAPTURE: "sc"}.get(sop_class, sop_class)


@pytest.fixture(scope="module")
def viewer_study(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerStudy]:
    """The photo in Orthanc and the node's SEG, SC and SR delivered there by STOW-RS."""
    workdir = tmp_path_factory.mktemp("ohif_viewer")
    node_port = free_port()
    orthanc = DicomWebOrthanc(workdir / "orthanc", node_port, routing=True).start()
    config = node_config(
        workdir / "data", small_model_dir, node_port, orthanc.dicom_port,
        destinations=[{"name": "pacs", "kind": "dicomweb", "url": orthanc.dicomweb_url}],
        worker={"count": 1, "torch_threads": 2, "runtime": "eager"},
    )
    node = NodeProcess(workdir / "node", config)
    try:
        node.start()
        rgb = synthetic_rgb(*PHOTO_HW)
        photo = make_vl_photo(rgb)
        request = urllib.request.Request(orthanc.url + "/instances", data=_part10(photo), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        study_uid = str(photo.StudyInstanceUID)
        jobs = node.wait_jobs_final(1, RESULTS_TIMEOUT_S)
        assert [j.state.value for j in jobs] == ["done"], node.log_text()[-3000:]
        instances = wait_until(lambda: (found := orthanc.study_instances(study_uid)) and len(found) >= 4 and found,
                               30, "Orthanc to hold the photo and its SEG, SC and SR")
        objects = {}
        for instance in instances:
            ds = pydicom.dcmread(io.BytesIO(orthanc.download(instance["ID"])))
            objects[_kind(ds)] = ds
        assert sorted(objects) == ["photo", "sc", "seg", "sr"], sorted(objects)
        log = node.log_text()
        assert "event=dispatch.sent" in log and "destination=pacs" in log, log[-3000:]
        yield ViewerStudy(orthanc, study_uid, rgb, objects)
    finally:
        node.stop()
        orthanc.stop()


# --------------------------------------------------------------------------- OHIF in Chromium


@pytest.fixture(scope="module")
def ohif(viewer_study: ViewerStudy) -> Iterator[OhifServer]:
    try:
        dist = ohif_dist()
    except OhifUnavailableError as exc:
        pytest.fail(f"the OHIF viewer is needed for this test: {exc}", pytrace=False)
    server = OhifServer(dist, viewer_study.orthanc.url).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Viewer:
    page: Page
    server: OhifServer
    study: ViewerStudy
    console_errors: list[str] = field(default_factory=list)

    def diagnostics(self) -> str:
        requests = "\n".join(f"  {m} {p[:160]} -> {s}" for m, p, s in self.server.dicomweb_requests()[-15:])
        errors = "\n".join(f"  {e[:300]}" for e in self.console_errors[-10:])
        return f"\nbrowser console errors:\n{errors or '  none'}\nlast DICOMweb requests:\n{requests or '  none'}"


@pytest.fixture(scope="module")
def viewer(ohif: OhifServer, viewer_study: ViewerStudy) -> Iterator[Viewer]:
    with sync_playwright() as playwright:
        browser: Browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=WINDOW)
            found = Viewer(page, ohif, viewer_study)
            page.on("console", lambda m: found.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: found.console_errors.append(f"page error: {exc}"))
            yield found
        finally:
            browser.close()


@dataclass
class View:
    """One series as OHIF shows it: the page's screenshot and the image region on the object's grid."""

    name: str
    screenshot: np.ndarray  # the whole window, RGB
    image: np.ndarray  # the displayed image resampled to the object's rows x columns, float32 RGB
    path: Path


def _visible(locator: Locator) -> Locator | None:
    for index in range(locator.count()):
        if locator.nth(index).is_visible():
            return locator.nth(index)
    return None


def _click(page: Page, button_name: str) -> bool:
    """Click the visible button of that name; False when there is none (or it went away meanwhile)."""
    button = _visible(page.get_by_role("button", name=button_name, exact=True))
    if button is None:
        return False
    try:
        button.click(timeout=5_000)
    except PlaywrightError:
        return False
    return True


def _skip_tour(page: Page) -> bool:
    """OHIF's guided tour covers the viewport on the first visit: "Skip all" ends it for good (localStorage)."""
    return _click(page, "Skip all")


def _accept_segmentation(page: Page) -> bool:
    """Let OHIF load the SEG: "Yes" to "Do you want to open this Segmentation?" where it asks, else the
    viewport's "LOAD" button (3.13.2 shows the SEG as a preview on its source image with that button)."""
    if _visible(page.get_by_text("open this Segmentation", exact=False)) is not None:
        return _click(page, "Yes")
    load = _visible(page.get_by_text("LOAD", exact=True))
    if load is None:
        return False
    try:
        load.click(timeout=5_000)
    except PlaywrightError:
        return False
    return True


def _decline_tracking(page: Page) -> bool:
    """OHIF asks "Do you want to continue tracking measurements for this study?" over an SR: "No" keeps
    the SR read-only as it was stored (and takes the prompt off the image)."""
    if _visible(page.get_by_text("continue tracking measurements", exact=False)) is None:
        return False
    return _click(page, "No")


def _image_box(page: Page, rows: int, columns: int) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) of the image in the window: the viewport canvas with the image fitted in it."""
    boxes = [b for c in page.locator("canvas.cornerstone-canvas").all() if c.is_visible() and (b := c.bounding_box())]
    if not boxes:
        return None
    box = max(boxes, key=lambda b: b["width"] * b["height"])
    scale = min(box["width"] / columns, box["height"] / rows)
    width, height = columns * scale, rows * scale
    return box["x"] + (box["width"] - width) / 2, box["y"] + (box["height"] - height) / 2, width, height


def _resample(screenshot: np.ndarray, box: tuple[float, float, float, float], rows: int, columns: int) -> np.ndarray:
    x, y, width, height = box
    image = Image.fromarray(screenshot).resize((columns, rows), Image.Resampling.BILINEAR,
                                              box=(x, y, x + width, y + height))
    return np.asarray(image, dtype=np.float32)


def _near_black_fraction(image: np.ndarray) -> float:
    return float((image[CORE_ROWS].max(axis=-1) < NEAR_BLACK).mean())


def show(viewer: Viewer, name: str, series_uid: str, rows: int, columns: int,
         act: Callable[[Page], bool] | None = None, act_wait_s: float = 15.0) -> View:
    """Open the study at ``series_uid``, wait until the viewport stops changing, save the screenshot.

    ``act`` (e.g. accepting the SEG) is retried until it returns True or ``act_wait_s`` after the image
    appeared; the view counts as settled when three screenshots 0.5 s apart agree and the image is not
    black. A view that never settles is returned as it is at ``VIEW_TIMEOUT_S``: the pixel assertions
    then say what is wrong (a black viewport, no viewport at all).
    """
    page = viewer.page
    url = f"{viewer.server.url}/viewer?StudyInstanceUIDs={viewer.study.study_uid}&initialSeriesInstanceUID={series_uid}"
    page.goto(url, wait_until="domcontentloaded")
    started = time.monotonic()
    acted = act is None
    first_image_at: float | None = None
    previous: np.ndarray | None = None
    agreeing = 0
    screenshot = np.zeros((WINDOW["height"], WINDOW["width"], 3), np.uint8)
    image: np.ndarray | None = None
    while time.monotonic() - started < VIEW_TIMEOUT_S:
        _skip_tour(page)
        if not acted and act is not None:
            acted = act(page) or (first_image_at is not None and time.monotonic() - first_image_at > act_wait_s)
            if acted:
                previous, agreeing = None, 0
        screenshot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        box = _image_box(page, rows, columns)
        image = None if box is None else _resample(screenshot, box, rows, columns)
        if image is not None and _near_black_fraction(image) < 0.9:
            first_image_at = first_image_at or time.monotonic()
            if previous is not None and np.abs(image - previous).mean() < 0.5:
                agreeing += 1
            else:
                agreeing = 0
            if acted and agreeing >= 2:
                break
        previous = image
        time.sleep(0.5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"ohif-{name}.png"
    Image.fromarray(screenshot).save(path)
    assert image is not None, \
        f"OHIF shows no image viewport for the {name} series (screenshot: {path})" + viewer.diagnostics()
    return View(name, screenshot, image, path)


@pytest.fixture(scope="module")
def photo_view(viewer: Viewer, viewer_study: ViewerStudy) -> View:
    """The photo alone (its own series); the first visit, which also dismisses OHIF's guided tour."""
    page = viewer.page
    page.goto(f"{viewer.server.url}/viewer?StudyInstanceUIDs={viewer_study.study_uid}"
              f"&initialSeriesInstanceUID={viewer_study.series_uid('photo')}", wait_until="domcontentloaded")
    try:  # the tour opens a few seconds after the first image; later visits do not show it again
        wait_until(lambda: _skip_tour(page), TOUR_TIMEOUT_S, "OHIF's guided tour", interval_s=0.5)
    except AssertionError:
        pass  # no tour (e.g. a later OHIF): nothing to dismiss
    return show(viewer, "photo", viewer_study.series_uid("photo"), *PHOTO_HW)


# --------------------------------------------------------------------------- what the objects say


def segment_masks(seg: Dataset) -> dict[int, np.ndarray]:
    """Segment number -> its (rows, columns) mask, from a BINARY or FRACTIONAL SEG's frames."""
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    masks: dict[int, np.ndarray] = {}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks[number] = masks.get(number, np.zeros(frame.shape, bool)) | (frame > 0)
    return masks


def segment_colours(seg: Dataset) -> dict[int, np.ndarray]:
    """Segment number -> RGB of its Recommended Display CIELab Value (PS3.3 C.8.20.2)."""
    return {int(item.SegmentNumber): np.array(
        hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb(), np.float32)
        for item in seg.SegmentSequence if "RecommendedDisplayCIELabValue" in item}


def sr_outlines(sr: Dataset) -> list[np.ndarray]:
    """Every POLYLINE / POLYGON SCOORD of the SR's content tree as an (N, 2) array of (column, row)."""
    found: list[np.ndarray] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD" and item.get("GraphicType") in ("POLYLINE", "POLYGON"):
                found.append(np.asarray(item.GraphicData, np.float32).reshape(-1, 2))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.get("ContentSequence", []))
    return found


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 0


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_grow(~mask, pixels)


def _core(shape: tuple[int, int]) -> np.ndarray:
    core = np.zeros(shape, bool)
    core[CORE_ROWS] = True
    return core


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).sum(axis=-1) > CHANGED


# --------------------------------------------------------------------------- the tests


def test_photo_displays_as_stored(photo_view: View, viewer_study: ViewerStudy) -> None:
    """The geometry the other tests rely on: the resampled viewport is the photo, pixel for pixel."""
    core = _core(PHOTO_HW)
    error = np.abs(photo_view.image - viewer_study.photo_rgb.astype(np.float32))[core].mean()
    assert error < 8, f"the photo viewport differs from the photo by {error:.1f} grey levels on average " \
                      f"(screenshot: {photo_view.path})"


def test_secondary_capture_displays(viewer: Viewer, viewer_study: ViewerStudy, photo_view: View) -> None:
    sc = viewer_study.objects["sc"]
    view = show(viewer, "sc", viewer_study.series_uid("sc"), int(sc.Rows), int(sc.Columns))
    expected = np.asarray(sc.pixel_array, np.float32)
    core = _core(expected.shape[:2])
    error = np.abs(view.image - expected)[core].mean()
    assert error < 12, f"the SC viewport differs from the SC's pixels by {error:.1f} on average ({view.path})" \
                       + viewer.diagnostics()
    assert _near_black_fraction(view.image) < 0.1, f"the SC viewport is (mostly) black ({view.path})"
    colourfulness = (view.image.max(axis=-1) - view.image.min(axis=-1))[core].mean()
    assert colourfulness > 30, f"the SC viewport is grey, not a colour overlay ({view.path})"


def test_segmentation_drawn_on_the_photo(viewer: Viewer, viewer_study: ViewerStudy, photo_view: View) -> None:
    """Where the SEG's segments are, the viewport is the photo pulled toward each segment's colour;
    elsewhere it is the photo. A black viewport or a photo without overlay fails."""
    seg = viewer_study.objects["seg"]
    masks = segment_masks(seg)
    colours = segment_colours(seg)
    union = np.any(np.stack(list(masks.values())), axis=0)
    assert len(masks) >= 2 and union.mean() > 0.05, \
        f"the node's SEG should have segments over a visible area: {len(masks)} segments, {union.mean():.1%}"

    view = show(viewer, "seg", viewer_study.series_uid("seg"), *PHOTO_HW, act=_accept_segmentation)
    shown, photo = view.image, photo_view.image
    core = _core(PHOTO_HW)
    black = _near_black_fraction(shown)
    assert black < _near_black_fraction(photo) + 0.1, \
        f"the SEG viewport is black ({black:.0%} of it; screenshot: {view.path})" + viewer.diagnostics()

    changed = _changed(shown, photo)
    covered = _shrink(union, 4) & core  # away from the edges, where outlines and resampling blur
    uncovered = _shrink(~union, 4) & core
    assert changed[covered].mean() > 0.6, \
        f"only {changed[covered].mean():.0%} of the segmented area differs from the photo alone: no overlay " \
        f"drawn (screenshots: {view.path}, {photo_view.path})" + viewer.diagnostics()
    if uncovered.sum() > 0.01 * core.sum():
        assert changed[uncovered].mean() < 0.15, \
            f"{changed[uncovered].mean():.0%} of the area outside every segment differs from the photo: the " \
            f"overlay is not where the SEG says ({view.path})"

    # each large region moves toward the colour of a segment that covers it
    groups = np.zeros(PHOTO_HW, np.int64)
    for number, mask in masks.items():
        groups |= mask.astype(np.int64) << number
    checked = 0
    for key in np.unique(groups[covered]):
        region = (groups == key) & covered
        if region.sum() < 0.01 * core.sum():
            continue
        ratios = []
        for number in (n for n in masks if key >> n & 1 and n in colours):
            before = np.linalg.norm(photo[region] - colours[number], axis=-1).mean()
            after = np.linalg.norm(shown[region] - colours[number], axis=-1).mean()
            if before > 60:  # where the photo already has the segment's colour there is nothing to see
                ratios.append(after / before)
        if ratios:
            checked += 1
            assert min(ratios) < 0.8, \
                f"the region of segments {[n for n in masks if key >> n & 1]} does not take a segment's colour " \
                f"(distance ratio {min(ratios):.2f}; {view.path})"
    assert checked >= 1, "no segmented region large enough to check its colour"


def test_sr_outlines_drawn_on_the_photo(viewer: Viewer, viewer_study: ViewerStudy, photo_view: View) -> None:
    """OHIF draws the SR's TID 1500 measurement groups that carry image coordinates (SCOORD POLYLINE):
    along the outlines the viewport differs from the photo alone, away from them it does not."""
    outlines = sr_outlines(viewer_study.objects["sr"])
    assert outlines, "the node's SR carries no SCOORD outline, so OHIF has nothing to draw"
    lines = Image.new("L", (PHOTO_HW[1], PHOTO_HW[0]), 0)
    draw = ImageDraw.Draw(lines)
    for points in outlines:
        xy = [(float(c), float(r)) for c, r in points]
        draw.line(xy + xy[:1], fill=255, width=1)
    on_outline = np.asarray(lines) > 0
    core = _core(PHOTO_HW)
    band = _grow(on_outline, 2) & core
    away = ~_grow(on_outline, 20) & core

    view = show(viewer, "sr", viewer_study.series_uid("sr"), *PHOTO_HW, act=_decline_tracking, act_wait_s=6.0)
    shown, photo = view.image, photo_view.image
    black = _near_black_fraction(shown)
    assert black < _near_black_fraction(photo) + 0.1, \
        f"the SR viewport is black ({black:.0%} of it; screenshot: {view.path})" + viewer.diagnostics()
    changed = _changed(shown, photo)
    along, elsewhere = changed[band].mean(), changed[away].mean() if away.any() else 0.0
    # OHIF draws the outlines dashed and thin: about a third of the band around them changes; each
    # measurement's labels (every NUM of a region's merged TID 1411 + TID 1410 groups) are drawn as text
    # boxes beside it, which change pixels away from the outlines too (measured: 32 % along, 14 %
    # elsewhere; outline groups alone: 30 % and 3 %; outlines drawn 40 px off their place: 7 % and 4 %)
    assert along > 0.15 and along > 2 * elsewhere, \
        f"{along:.0%} of the pixels along the SR's outlines differ from the photo alone, {elsewhere:.0%} away " \
        f"from them: the outlines are not drawn (screenshots: {view.path}, {photo_view.path})" + viewer.diagnostics()
