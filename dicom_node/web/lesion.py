"""Lesion masks on the web side: the parsings kept for live recomputation, mask decoding, the figures.

A person paints a lesion on the parse page and sees the per-region table and the %TBSA after each
stroke. Re-running the network per stroke would take seconds; the label map it produced is all the
figures need, so :func:`~dicom_node.web.api.parse_router`'s ``/api/predict`` keeps each parsing
here under a random token and the lesion endpoint recomputes from it in milliseconds.

The photo and everything made from it is PHI. A kept parsing lives in this process's memory only
(never on disk), at most :data:`MAX_KEPT_PARSINGS` of them (the oldest is dropped first) and for at
most :data:`KEPT_PARSING_TTL_S` after it was made; expired ones are dropped on every access and by
the app's sweeper. The id is :func:`secrets.token_urlsafe` (192 bits), so one person's parsing
cannot be found by guessing.

Several kept parsings of one patient in one study (a front and a back photo) combine into one
%TBSA estimate (``POST /api/v1/tbsa``: :func:`study_photos`, :func:`study_tbsa`): each with its
latest mask and its view, pooled by :func:`~dicom_node.parse.tbsa.estimate_tbsa`.
"""

from __future__ import annotations

import dataclasses
import io
import secrets
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_node.decode.photo import Photo
from dicom_node.parse.report import photo_tbsa
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.statistics import lesion_statistics
from dicom_node.parse.tbsa import (
    Method,
    PhotoLesion,
    TbsaEstimate,
    View,
    estimate_tbsa,
    patient_age_years,
    resize_mask,
    view_of,
)
from dicom_node.web.schemas import PARSING_ID_PATTERN as PARSING_ID_PATTERN  # re-exported: api.py uses it
from dicom_node.web.uploads import UploadError

# Would be HttpSettings keys (http.kept_parsings, http.kept_parsing_ttl_s); config.py is owned
# elsewhere, so they are constants here until it grows them.
MAX_KEPT_PARSINGS = 20
KEPT_PARSING_TTL_S = 15 * 60.0
SWEEP_INTERVAL_S = 30.0  # how often the app drops expired parsings nobody asks for

ViewName = Literal["anterior", "posterior"]
MethodName = Literal["lund-browder", "rule-of-nines"]
DEFAULT_METHOD: MethodName = "lund-browder"
MAX_STUDY_PHOTOS = 8  # the most parsings one study estimate combines (POST /api/v1/tbsa)
ViewFrom = Literal["request", "dicom", "assumed"]
AgeFrom = Literal["request", "dicom", "unknown"]


@dataclass
class TbsaInputs:
    """What a %TBSA estimate depends on besides the masks; None: from the DICOM photo, or the default."""

    view: ViewName | None = None
    age_years: float | None = None
    method: MethodName | None = None


@dataclass
class KeptParsing:
    """One parsing kept for recomputation, with the latest lesion painted on it."""

    parsing_id: str
    result: ParsingResult  # for a JPEG/PNG upload only the label map (instances dropped: they serve the SR)
    source: str
    base_report: dict[str, Any]  # parse_report() without lesion: the report.json download starts from it
    photo_ds: Dataset | None  # the DICOM photo: the SR references it and copies its patient and study
    photo_rgb: np.ndarray | None  # DICOM uploads only: the SR download renders the overlay SC from it
    created_s: float
    lesion_mask: np.ndarray | None = None  # bool (H, W): the latest mask sent
    tbsa_inputs: TbsaInputs = dataclasses.field(default_factory=TbsaInputs)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def sr_available(self) -> bool:
        return self.photo_ds is not None


class ParsingStore:
    """Parsings in memory, bounded in count and in age; see the module docstring for why."""

    def __init__(self, max_count: int = MAX_KEPT_PARSINGS, ttl_s: float = KEPT_PARSING_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_count = max_count
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[str, KeptParsing] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, result: ParsingResult, photo: Photo, base_report: dict[str, Any]) -> KeptParsing:
        is_dicom = photo.dataset is not None
        if not is_dicom:
            result = dataclasses.replace(result, persons=[], parts=[])
        kept = KeptParsing(parsing_id=secrets.token_urlsafe(24), result=result, source=photo.source,
                           base_report=base_report, photo_ds=photo.dataset,
                           photo_rgb=photo.rgb if is_dicom else None, created_s=self.clock())
        with self._lock:
            self._sweep_locked()
            self._items[kept.parsing_id] = kept
            while len(self._items) > self.max_count:
                self._items.popitem(last=False)
        return kept

    def get(self, parsing_id: str) -> KeptParsing | None:
        with self._lock:
            self._sweep_locked()
            return self._items.get(parsing_id)

    def sweep(self) -> None:
        with self._lock:
            self._sweep_locked()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def expires_in_s(self, kept: KeptParsing) -> float:
        return max(0.0, kept.created_s + self.ttl_s - self.clock())

    def _sweep_locked(self) -> None:
        now = self.clock()
        for key in [k for k, v in self._items.items() if now - v.created_s >= self.ttl_s]:
            del self._items[key]


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class DecodedMask:
    mask: np.ndarray  # bool (H, W) at the photo's size
    sent_size: tuple[int, int]  # (width, height) as sent
    resampled: bool

    def info(self) -> dict[str, Any]:
        h, w = self.mask.shape
        return {"width": self.sent_size[0], "height": self.sent_size[1], "resampled": self.resampled,
                "resampled_to": {"width": w, "height": h} if self.resampled else None,
                "resampling": "nearest-neighbour" if self.resampled else None,
                "lesion_pixels": int(np.count_nonzero(self.mask))}


def decode_lesion_mask(data: bytes, shape_hw: tuple[int, int], max_pixels: int) -> DecodedMask:
    """A lesion mask from image bytes (PNG, or any format Pillow reads), at the photo's size.

    A pixel is lesion when it is neither black nor transparent: non-zero in a grey or colour image,
    and, where the image has alpha, also not fully transparent (a canvas export is RGBA with
    unpainted pixels at 0,0,0,0). A mask of another size is resampled nearest-neighbour to the
    photo's, so no new values appear at edges. 413 for too many pixels, 422 for bytes that are not
    an image.
    """
    if not data:
        raise UploadError(422, "bad_mask", "the lesion mask is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(413, "too_many_pixels",
                                  f"the lesion mask has {width}x{height} pixels, more than this node's "
                                  f"limit of {max_pixels}")
            image.load()
            mask = _lesion_pixels(image)
    except UploadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError, TypeError) as exc:
        raise UploadError(422, "bad_mask", f"the lesion mask is not a readable image ({type(exc).__name__})") \
            from None
    if mask.shape != shape_hw:
        return DecodedMask(resize_mask(mask, shape_hw), (width, height), True)
    return DecodedMask(mask, (width, height), False)


def _lesion_pixels(image: Image.Image) -> np.ndarray:
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return pixels != 0
    if pixels.ndim != 3:
        raise ValueError("unexpected pixel layout")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        colour, alpha = pixels[..., :-1], pixels[..., -1]
        return np.any(colour != 0, axis=2) & (alpha != 0)
    return np.any(pixels != 0, axis=2)


# --------------------------------------------------------------------------- figures


def resolved_settings(asked: TbsaInputs, photo_ds: Dataset | None) -> tuple[View | None, float | None, Method]:
    """View, age and method for an estimate: what was asked, else what the DICOM photo says, else defaults.

    A view still unknown stays None: :func:`~dicom_node.parse.report.photo_tbsa` then takes the
    photo as anterior and says so in the estimate's warnings, as ``dicom-node parse`` does.
    """
    view = View(asked.view) if asked.view is not None else None
    age = asked.age_years
    if photo_ds is not None:
        view = view or view_of(photo_ds)
        age = age if age is not None else patient_age_years(photo_ds)
    return view, age, Method(asked.method or DEFAULT_METHOD)


def tbsa_estimate(result: ParsingResult, photo_ds: Dataset | None, mask: np.ndarray,
                  asked: TbsaInputs) -> TbsaEstimate:
    """The %TBSA of one photo's mask, as the parse report computes it."""
    view, age, method = resolved_settings(asked, photo_ds)
    return photo_tbsa(result, mask, view, age, method)


def lesion_figures(result: ParsingResult, photo_ds: Dataset | None, mask: np.ndarray,
                   asked: TbsaInputs) -> dict[str, Any]:
    """``{"lesion": [...], "tbsa": {...}}`` for one mask on one parsing, without the network.

    The same two entries :func:`~dicom_node.parse.report.parse_report` writes for a lesion mask
    (it is not called itself: a kept JPEG/PNG parsing has its instances dropped, and the rest of
    the report was made at upload).
    """
    lesion = [vars(r) for r in lesion_statistics(result, mask)]
    return {"lesion": lesion, "tbsa": tbsa_estimate(result, photo_ds, mask, asked).to_json()}


def structured_report(kept: KeptParsing, mask: np.ndarray | None, asked: TbsaInputs) -> bytes:
    """The Measurement Report SR with the lesion and the %TBSA, as Part 10 bytes.

    Only for DICOM uploads: a JPEG or PNG has no patient, study or source image for the SR to name,
    and an SR made up around it would file findings under an invented patient.
    """
    from dicom_node.encode.results import encode_results  # lazy: highdicom is slow to import

    if kept.photo_ds is None or kept.photo_rgb is None:
        raise ValueError("the SR is made only for DICOM uploads")
    tbsa = tbsa_estimate(kept.result, kept.photo_ds, mask, asked) if mask is not None else None
    encoded = encode_results(kept.photo_ds, kept.photo_rgb, kept.result, lesion_mask=mask, tbsa=tbsa)
    buffer = DicomBytesIO()
    encoded.sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- one study's photos


@dataclass(frozen=True)
class StudyPhoto:
    """One kept parsing in a study estimate: its latest mask and the view it is counted with."""

    kept: KeptParsing
    mask: np.ndarray
    view: View
    view_from: ViewFrom

    def describe(self, index: int) -> str:
        return f"photo {index + 1} ({self.kept.source}, parsing {self.kept.parsing_id})"


def study_photos(store: ParsingStore, parsing_ids: Sequence[str]) -> list[StudyPhoto]:
    """The kept parsings of one study estimate, each with its latest mask and its view.

    Refused (:class:`~dicom_node.web.uploads.UploadError`): 422 for an empty list, more than
    :data:`MAX_STUDY_PHOTOS`, an id named twice, or DICOM photos of different patients or studies;
    404 for an id the store does not hold (never made, expired, pushed out); 409 for a parsing with
    no lesion mask sent yet. The view is the one given with the parsing's latest mask, else its
    DICOM photo's View Code Sequence, else anterior (``view_from`` "assumed": the estimate warns).
    """
    ids = list(parsing_ids)
    if not ids:
        raise UploadError(422, "bad_parsing_list",
                          "name at least one parsing (the parsing ids /api/predict returned)")
    if len(ids) > MAX_STUDY_PHOTOS:
        raise UploadError(422, "bad_parsing_list",
                          f"{len(ids)} parsings named: one estimate combines at most {MAX_STUDY_PHOTOS} photos")
    twice = [i for i, n in Counter(ids).items() if n > 1]
    if twice:
        raise UploadError(422, "bad_parsing_list",
                          f"parsing {twice[0]} is named more than once: each photo counts once")
    kept_list: list[KeptParsing] = []
    for index, parsing_id in enumerate(ids):
        kept = store.get(parsing_id)
        if kept is None:
            raise UploadError(404, "not_found", f"photo {index + 1}: no such parsing {parsing_id} (they are kept "
                                                f"for {store.ttl_s / 60:g} minutes): parse the photo again")
        kept_list.append(kept)
    photos: list[StudyPhoto] = []
    for index, kept in enumerate(kept_list):
        with kept.lock:
            mask, asked_view = kept.lesion_mask, kept.tbsa_inputs.view
        if mask is None:
            raise UploadError(409, "no_lesion", f"photo {index + 1} ({kept.source}, parsing {kept.parsing_id}) has "
                                                "no lesion painted yet: paint it first (for a photo without lesion, "
                                                "send an empty mask)")
        dicom_view = view_of(kept.photo_ds) if kept.photo_ds is not None else None
        view_from: ViewFrom
        if asked_view is not None:
            view, view_from = View(asked_view), "request"
        elif dicom_view is not None:
            view, view_from = dicom_view, "dicom"
        else:
            view, view_from = View.ANTERIOR, "assumed"
        photos.append(StudyPhoto(kept, mask, view, view_from))
    _same_patient_and_study(photos)
    return photos


def _same_patient_and_study(photos: Sequence[StudyPhoto]) -> None:
    """422 when two DICOM photos name different patients (PatientID) or studies (StudyInstanceUID)."""
    dicom = [(i, p, p.kept.photo_ds) for i, p in enumerate(photos) if p.kept.photo_ds is not None]
    if not dicom:
        return
    first_index, first, first_ds = dicom[0]
    for keyword, what, code in (("PatientID", "patient", "different_patients"),
                                ("StudyInstanceUID", "study", "different_studies")):
        reference = str(first_ds.get(keyword, "") or "").strip()
        for index, photo, ds in dicom[1:]:
            if str(ds.get(keyword, "") or "").strip() != reference:
                raise UploadError(422, code, f"{photo.describe(index)} is of another {what} than "
                                             f"{first.describe(first_index)}: their {keyword} differ. One estimate "
                                             "combines the photos of one patient in one study")


def study_tbsa(photos: Sequence[StudyPhoto], age_years: float | None,
               method: MethodName | None) -> dict[str, Any]:
    """One %TBSA estimate of a study's photos, :meth:`TbsaEstimate.to_json` with ``photos`` and ``age_from``.

    Age: the one asked, else the first DICOM photo's that says (Patient's Age or Birth Date), else
    unknown (the estimate then uses the adult chart and warns). Method: the one asked, else
    :data:`DEFAULT_METHOD`.
    """
    age = age_years
    age_from: AgeFrom = "request" if age_years is not None else "unknown"
    if age is None:
        for photo in photos:
            if photo.kept.photo_ds is not None:
                age = patient_age_years(photo.kept.photo_ds)
                if age is not None:
                    age_from = "dicom"
                    break
    estimate = estimate_tbsa([PhotoLesion(p.kept.result.label_map, p.mask, p.view) for p in photos], age,
                             Method(method or DEFAULT_METHOD))
    notes = [f"{p.describe(i)}: view unknown (none given with its mask, no View Code Sequence): taken as "
             "anterior" for i, p in enumerate(photos) if p.view_from == "assumed"]
    if len(photos) > 1:
        notes += [f"{p.describe(i)} is a JPEG or PNG: nothing checks that it shows the same patient and study"
                  for i, p in enumerate(photos) if p.kept.photo_ds is None]
    answer = estimate.to_json()
    answer["warnings"] = [*notes, *answer["warnings"]]
    answer["age_from"] = age_from
    answer["photos"] = [{"parsing": p.kept.parsing_id, "source": p.kept.source, "view": str(p.view),
                         "view_from": p.view_from} for p in photos]
    return answer
