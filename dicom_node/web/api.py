"""The REST API: parse a photo, list and retry jobs, health, readiness and metrics.

Handlers stay on the event loop only to read the request and write the answer. Parsing runs in a
worker thread (see :class:`~dicom_node.web.parsing.ParserProvider`); every job store call runs on
one dedicated thread, because the SQLite store keeps a connection per thread and the event loop's
thread pool comes and goes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from anyio import to_thread
from fastapi import APIRouter, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from dicom_node.config import HttpSettings
from dicom_node.logs import fields
from dicom_node.monitor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dicom_node.monitor.metrics import SOURCE_API, NodeMetrics
from dicom_node.monitor.readiness import Readiness
from dicom_node.parse.classes import CLASS_COLORS, CLASS_NAMES
from dicom_node.queue.job import JobState
from dicom_node.queue.store import JobNotFoundError, JobStore, StaleJobError
from dicom_node.web.lesion import (
    MAX_STUDY_PHOTOS,
    PARSING_ID_PATTERN,
    DecodedMask,
    KeptParsing,
    MethodName,
    ParsingStore,
    TbsaInputs,
    ViewName,
    decode_lesion_mask,
    lesion_figures,
    structured_report,
    study_photos,
    study_tbsa,
)
from dicom_node.web.parsing import ParserBusyError, ParserProvider, Prediction, predict
from dicom_node.web.schemas import (
    Alive,
    CheckOut,
    ClassInfo,
    ErrorBody,
    JobDetail,
    JobOut,
    JobPage,
    LesionAnswer,
    ParseAnswer,
    ReadinessOut,
    StudyTbsaAnswer,
    StudyTbsaRequest,
    UploadInfo,
)
from dicom_node.web.uploads import UploadError, photo_from_upload, safe_filename

log = logging.getLogger(__name__)

T = TypeVar("T")

METADATA_HEADER = "X-Parse-Metadata"
PREDICT_PATH = "/api/predict"
MAX_JOB_ID = 2**63 - 1  # SQLite INTEGER
MAX_PAGE = 500
MAX_OFFSET = 10_000

JobId = Annotated[int, Path(ge=1, le=MAX_JOB_ID, description="the job's id")]
ParsingId = Annotated[str, Path(pattern=PARSING_ID_PATTERN, description="the parsing_id /api/predict returned")]
ViewParam = Annotated[ViewName | None, Query(description="which side of the body the photo shows; default: the "
                                                         "DICOM header's View Code, else anterior")]
AgeParam = Annotated[float | None, Query(ge=0, le=130, description="patient age in years (the chart's age "
                                                                   "group); default: the DICOM header's")]
MethodParam = Annotated[MethodName | None, Query(description="%TBSA chart; default lund-browder")]
PARSINGS_PATH = "/api/v1/parsings"
LESION_PATH_PATTERN = r"/api/v1/parsings/[^/]+/lesion"
STUDY_TBSA_PATH = "/api/v1/tbsa"


@dataclass
class WebContext:
    """What the handlers use; built by :func:`~dicom_node.web.app.create_app`."""

    parser: ParserProvider
    job_store: JobStore | None
    readiness: Readiness
    metrics: NodeMetrics
    settings: HttpSettings
    parsings: ParsingStore = field(default_factory=ParsingStore)  # for live lesion figures; memory only
    _store_thread: ThreadPoolExecutor | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    async def in_store_thread(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._store_thread is None:
                self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-job-store")
            executor = self._store_thread
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def close(self) -> None:
        """Stop the job store thread (a later call starts a new one)."""
        with self._lock:
            executor, self._store_thread = self._store_thread, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def store(self) -> JobStore:
        if self.job_store is None:
            raise HTTPException(503, "this server has no job store (it is not running as part of a node)")
        return self.job_store


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data is not None else None


def _ascii_stem(source: str) -> str:
    stem = source.rsplit(".", 1)[0] if "." in source else source
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:100] or "photo"


def parse_router(ctx: WebContext) -> APIRouter:
    router = APIRouter(tags=["parse"])
    settings = ctx.settings

    @router.post(
        PREDICT_PATH,
        summary="Parse a photo (JPEG, PNG or DICOM) into body regions",
        description=(
            "Returns the colour segmentation as PNG with the parsing summary as JSON in the "
            f"`{METADATA_HEADER}` header, or with `format=json` one JSON document holding the summary, "
            "the full parse report and the images base64-encoded."
        ),
        response_class=Response,
        responses={
            200: {
                "model": ParseAnswer,
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "headers": {METADATA_HEADER: {"description": "the ParseMetadata as compact JSON",
                                              "schema": {"type": "string"}}},
            },
            400: {"model": ErrorBody, "description": "missing or damaged photo"},
            413: {"model": ErrorBody, "description": "upload, photo or lesion mask too large"},
            415: {"model": ErrorBody, "description": "not JPEG, PNG or DICOM, or a DICOM photo we do not handle"},
            422: {"model": ErrorBody, "description": "the lesion mask is not a readable image"},
            503: {"model": ErrorBody, "description": "model unavailable, or busy with other photos"},
        },
    )
    async def predict_photo(
        image: Annotated[UploadFile, File(description="the photo: JPEG, PNG or DICOM")],
        format: Annotated[Literal["png", "json"], Query(description="png (default) or json")] = "png",  # noqa: A002
        include_original: Annotated[bool, Query(description="json only: add the decoded photo as PNG")] = False,
        lesion_mask: Annotated[UploadFile | None, File(
            description="optional lesion mask (PNG or any common image format): a pixel that is neither black "
                        "nor transparent is lesion; another size than the photo's is resampled "
                        "nearest-neighbour to it (metadata.lesion_mask says so)")] = None,
        view: ViewParam = None,
        age_years: AgeParam = None,
        tbsa_method: MethodParam = None,
    ) -> Response:
        filename = safe_filename(image.filename)
        data = await image.read()
        await image.close()
        mask_data: bytes | None = None
        if lesion_mask is not None:
            mask_data = await lesion_mask.read()
            await lesion_mask.close()
        asked = TbsaInputs(view, age_years, tbsa_method)

        def work() -> tuple[Prediction, KeptParsing, DecodedMask | None]:
            photo = photo_from_upload(data, filename, settings.max_pixels)
            ctx.metrics.received(SOURCE_API)
            # the mask is checked before the network runs: a bad mask costs no parse
            mask = (decode_lesion_mask(mask_data, photo.rgb.shape[:2], settings.max_pixels)
                    if mask_data is not None else None)
            with ctx.parser.exclusive() as parser:
                prediction = predict(parser, photo, include_original and format == "json")
            kept = ctx.parsings.keep(prediction.result, photo, prediction.report)
            if mask is not None:
                with kept.lock:
                    kept.lesion_mask, kept.tbsa_inputs = mask.mask, asked
                prediction.report.update(lesion_figures(prediction.result, photo.dataset, mask.mask, asked))
            return prediction, kept, mask

        try:
            with ctx.parser.admitted():
                prediction, kept, mask = await to_thread.run_sync(work)
        except UploadError as exc:
            ctx.metrics.rejected(exc.code, SOURCE_API)
            log.info(fields(event="http.predict_refused", status=exc.status, reason=exc.message))
            raise
        except ParserBusyError:
            ctx.metrics.rejected("busy", SOURCE_API)
            raise
        ctx.metrics.observe_parse(prediction.parse_s, SOURCE_API)
        metadata = dict(prediction.metadata)
        metadata["parsing"] = {"id": kept.parsing_id, "expires_in_s": ctx.parsings.expires_in_s(kept),
                               "sr_available": kept.sr_available}
        if mask is not None:
            metadata["lesion_mask"] = mask.info()
        log.info(fields(event="http.predict", persons=metadata["person_count"], seconds=f"{prediction.parse_s:.3f}",
                        size=f"{metadata['image_size']['width']}x{metadata['image_size']['height']}"))
        header = json.dumps(metadata, separators=(",", ":"), ensure_ascii=True)
        if format == "json":
            body = {
                "status": "ok",
                "metadata": metadata,
                "report": prediction.report,
                "images": {"color_png": _b64(prediction.color_png), "overlay_png": _b64(prediction.overlay_png),
                           "original_png": _b64(prediction.original_png)},
            }
            return Response(json.dumps(body), media_type="application/json",
                            headers={METADATA_HEADER: header, "Cache-Control": "no-store"})
        stem = _ascii_stem(filename)
        return Response(prediction.color_png, media_type="image/png", headers={
            METADATA_HEADER: header,
            "Content-Disposition": f'inline; filename="{stem}_color.png"',
            "Cache-Control": "no-store",
        })

    @router.get("/api/v1/info", response_model=UploadInfo, summary="What /api/predict accepts")
    def info() -> UploadInfo:
        return UploadInfo(max_upload_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                          formats=["jpeg", "png", "dicom"], model_loaded=ctx.parser.loaded is not None)

    @router.get("/api/v1/classes", response_model=list[ClassInfo], summary="The classes and their colours")
    def classes() -> list[ClassInfo]:
        return [ClassInfo(index=i, name=name, color=list(CLASS_COLORS[i])) for i, name in enumerate(CLASS_NAMES)]

    return router


_MASK_BODY = {
    "required": True,
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["lesion_mask"], "properties": {
            "lesion_mask": {"type": "string", "format": "binary"}}}},
    },
}
_NOT_KEPT = {"model": ErrorBody, "description": "no such parsing: never made, forgotten after its time, or "
                                                "pushed out by newer ones"}


def parsings_router(ctx: WebContext) -> APIRouter:
    """Lesion figures, report and SR of a parsing kept by /api/predict, recomputed without the network;
    and one %TBSA estimate of several such parsings of one study (``POST /api/v1/tbsa``)."""
    router = APIRouter(tags=["lesion"])  # no prefix: /api/v1/tbsa is here too
    settings = ctx.settings

    def kept_or_404(parsing_id: str) -> KeptParsing:
        kept = ctx.parsings.get(parsing_id)
        if kept is None:
            raise HTTPException(404, "no such parsing (they are kept for "
                                     f"{ctx.parsings.ttl_s / 60:g} minutes): parse the photo again")
        return kept

    def settings_of(kept: KeptParsing, view: ViewName | None, age_years: float | None,
                    method: MethodName | None) -> TbsaInputs:
        stored = kept.tbsa_inputs
        return TbsaInputs(view or stored.view, age_years if age_years is not None else stored.age_years,
                              method or stored.method)

    @router.post(
        f"{PARSINGS_PATH}/{{parsing_id}}/lesion", response_model=LesionAnswer,
        summary="Per-region lesion figures and %TBSA of a mask on a kept parsing",
        description=(
            "The body is the mask: a PNG (or any common image format), or multipart/form-data with the "
            "field `lesion_mask`. A pixel that is neither black nor transparent is lesion; a mask of "
            "another size than the photo's is resampled nearest-neighbour. The figures come from the "
            "kept label map: the network does not run. The mask becomes this parsing's lesion for "
            "report.json and sr.dcm."),
        openapi_extra={"requestBody": _MASK_BODY},
        responses={400: {"model": ErrorBody, "description": "invalid parameters or multipart body"},
                   404: _NOT_KEPT, 413: {"model": ErrorBody, "description": "mask too large"},
                   422: {"model": ErrorBody, "description": "the mask is not a readable image"}},
    )
    async def post_lesion(request: Request, parsing_id: ParsingId, view: ViewParam = None,
                          age_years: AgeParam = None, tbsa_method: MethodParam = None) -> LesionAnswer:
        kept = kept_or_404(parsing_id)
        data = await _mask_bytes(request)
        asked = TbsaInputs(view, age_years, tbsa_method)

        def work() -> LesionAnswer:
            started = time.perf_counter()
            mask = decode_lesion_mask(data, kept.result.size_hw, settings.max_pixels)
            figures = lesion_figures(kept.result, kept.photo_ds, mask.mask, asked)
            with kept.lock:
                kept.lesion_mask, kept.tbsa_inputs = mask.mask, asked
            return LesionAnswer.model_validate({"parsing_id": parsing_id, **figures, "lesion_mask": mask.info(),
                                                "compute_s": round(time.perf_counter() - started, 4)})

        answer = await to_thread.run_sync(work)
        h, w = kept.result.size_hw
        log.info(fields(event="http.lesion", size=f"{w}x{h}", seconds=f"{answer.compute_s:.4f}"))
        return answer

    @router.get(
        f"{PARSINGS_PATH}/{{parsing_id}}/report.json", summary="The parse report with the latest lesion and %TBSA",
        response_class=JSONResponse,
        responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}, 404: _NOT_KEPT},
    )
    async def report_json(parsing_id: ParsingId, view: ViewParam = None, age_years: AgeParam = None,
                          tbsa_method: MethodParam = None) -> JSONResponse:
        kept = kept_or_404(parsing_id)

        def work() -> dict[str, Any]:
            with kept.lock:
                mask, asked = kept.lesion_mask, settings_of(kept, view, age_years, tbsa_method)
            report = dict(kept.base_report)
            if mask is not None:
                report.update(lesion_figures(kept.result, kept.photo_ds, mask, asked))
            return report

        report = await to_thread.run_sync(work)
        stem = _ascii_stem(kept.source)
        return JSONResponse(report, headers={"Cache-Control": "no-store",
                                             "Content-Disposition": f'attachment; filename="{stem}.json"'})

    @router.get(
        f"{PARSINGS_PATH}/{{parsing_id}}/sr.dcm",
        summary="The Measurement Report SR with the latest lesion (DICOM uploads only)",
        response_class=Response,
        responses={200: {"content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}}},
                   404: _NOT_KEPT,
                   409: {"model": ErrorBody, "description": "a JPEG or PNG upload: it has no patient, study or "
                                                            "source image for an SR to name"}},
    )
    async def sr_dcm(parsing_id: ParsingId, view: ViewParam = None, age_years: AgeParam = None,
                     tbsa_method: MethodParam = None) -> Response:
        kept = kept_or_404(parsing_id)
        if not kept.sr_available:
            raise HTTPException(409, "the SR is made only for DICOM uploads: a JPEG or PNG has no patient, study "
                                     "or source image for it to reference")

        def work() -> bytes:
            with kept.lock:
                mask, asked = kept.lesion_mask, settings_of(kept, view, age_years, tbsa_method)
            return structured_report(kept, mask, asked)

        data = await to_thread.run_sync(work)
        stem = _ascii_stem(kept.source)
        return Response(data, media_type="application/dicom", headers={
            "Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="{stem}_sr.dcm"'})

    @router.post(
        STUDY_TBSA_PATH, response_model=StudyTbsaAnswer,
        summary="One %TBSA estimate of several kept parsings of one patient in one study (front and back)",
        description=(
            f"Combines up to {MAX_STUDY_PHOTOS} kept parsings, each with the latest lesion mask sent to "
            "`/api/v1/parsings/{id}/lesion` (or with /api/predict), into one estimate: photos of the same view "
            "are pooled by pixels and each view contributes its half of the chart, so a front and a back photo "
            "give `view` \"both\". A photo's view is the one sent with its latest mask, else its DICOM View "
            "Code Sequence, else anterior (with a warning). Age: `age_years`, else the first DICOM photo's "
            "(Patient's Age or Birth Date), else unknown (adult chart, with a warning). DICOM photos must name "
            "one PatientID and one StudyInstanceUID. The network does not run."),
        responses={400: {"model": ErrorBody, "description": "not a JSON body of this shape, or a malformed id"},
                   404: {"model": ErrorBody, "description": "a parsing the node does not hold: never made, "
                                                            "forgotten after its time, or pushed out by newer ones"},
                   409: {"model": ErrorBody, "description": "a parsing has no lesion mask yet"},
                   422: {"model": ErrorBody, "description": "no parsing named, one named twice, more than "
                                                            f"{MAX_STUDY_PHOTOS}, or DICOM photos of different "
                                                            "patients or studies"}},
    )
    async def post_study_tbsa(body: StudyTbsaRequest) -> StudyTbsaAnswer:
        def work() -> StudyTbsaAnswer:
            photos = study_photos(ctx.parsings, body.parsings)
            return StudyTbsaAnswer.model_validate(study_tbsa(photos, body.age_years, body.method))

        answer = await to_thread.run_sync(work)
        log.info(fields(event="http.study_tbsa", photos=len(answer.photos), view=answer.view))
        return answer

    return router


async def _mask_bytes(request: Request) -> bytes:
    """The mask from a bare image body, or from the multipart field ``lesion_mask``."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return await request.body()
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # starlette's MultiPartException and friends: a malformed envelope
        raise HTTPException(400, f"unreadable multipart body: {exc}") from None
    try:
        part = form.get("lesion_mask")
        if part is None or isinstance(part, str):
            raise HTTPException(400, "lesion_mask: a file field is required")
        return await part.read()
    finally:
        await form.close()


def jobs_router(ctx: WebContext) -> APIRouter:
    router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

    @router.get("", response_model=JobPage, summary="Jobs, newest first",
                responses={503: {"model": ErrorBody, "description": "no job store"}})
    async def list_jobs(
        state: Annotated[list[JobState] | None, Query(description="only jobs in these states (repeatable)")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> JobPage:
        store = ctx.store()
        states = list(dict.fromkeys(state)) if state else None

        def read() -> JobPage:
            counts = store.counts()
            jobs = store.list_jobs(states, limit=offset + limit)[offset:]
            total = sum(counts.get(s, 0) for s in (states or list(JobState)))
            return JobPage(jobs=[JobOut.of(j) for j in jobs], counts={s.value: counts.get(s, 0) for s in JobState},
                           total=total, limit=limit, offset=offset)

        return await ctx.in_store_thread(read)

    @router.get("/{job_id}", response_model=JobDetail, summary="One job with its history",
                responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
    async def get_job(job_id: JobId) -> JobDetail:
        store = ctx.store()

        def read() -> JobDetail:
            try:
                job = store.get(job_id)
            except JobNotFoundError:
                raise HTTPException(404, f"no job {job_id}") from None
            return JobDetail.with_history(job, store.history(job_id))

        return await ctx.in_store_thread(read)

    @router.post("/{job_id}/retry", response_model=JobOut, summary="Re-open a failed job",
                 responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "job not failed"},
                            503: {"model": ErrorBody}})
    async def retry_job(job_id: JobId) -> JobOut:
        store = ctx.store()

        def retry() -> JobOut:
            try:
                job = store.retry(job_id, "retried from the web UI")
            except JobNotFoundError:
                raise HTTPException(404, f"no job {job_id}") from None
            except StaleJobError as exc:
                raise HTTPException(409, str(exc)) from None
            return JobOut.of(job)

        return await ctx.in_store_thread(retry)

    return router


def health_router(ctx: WebContext) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Alive, summary="The process is alive")
    def healthz() -> Alive:
        return Alive(status="alive")

    @router.get("/readyz", response_model=ReadinessOut, summary="Ready to process photos",
                responses={503: {"model": ReadinessOut, "description": "not ready: see the failed checks"}})
    async def readyz() -> JSONResponse:
        ready, results = await ctx.in_store_thread(ctx.readiness.evaluate)
        body = ReadinessOut(ready=ready, checks={k: CheckOut(ok=r.ok, detail=r.detail) for k, r in results.items()})
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503,
                            headers={"Cache-Control": "no-store"})

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        text = await ctx.in_store_thread(ctx.metrics.render)
        return Response(text, media_type=METRICS_CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    return router
