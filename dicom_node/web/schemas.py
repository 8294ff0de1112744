"""The shapes of the REST API's answers, as pydantic models: they are what /openapi.json documents."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from dicom_node.queue.job import Job, JobEvent, JobState

# The random token naming a kept parsing (dicom_node.web.lesion); here, since the request models need it.
PARSING_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"


class ErrorBody(BaseModel):
    error: str = Field(description="a short code: bad_request, too_large, unsupported_media_type, not_found, ...")
    message: str = Field(description="what went wrong, for a person")


# --------------------------------------------------------------------------- parsing


class ImageSize(BaseModel):
    width: int
    height: int


class RegionStatistics(BaseModel):
    class_index: int
    label: str
    pixels: int
    image_fraction: float = Field(description="share of all photo pixels")
    person_fraction: float | None = Field(description="share of the person pixels; null when no person was found")


class ModelInfo(BaseModel):
    digest: str = Field(description="SHA-256 of the model weights")
    untrained: bool = Field(description="true for a test model with random weights: the parsing is meaningless")


class KeptParsingOut(BaseModel):
    id: str = Field(description="random token naming this parsing at /api/v1/parsings/{id}/...; kept in memory "
                                "only, for a limited time")
    expires_in_s: float = Field(description="seconds until the node forgets it (then 404)")
    sr_available: bool = Field(description="true for DICOM uploads: only they can have the SR download")


class MaskInfo(BaseModel):
    width: int = Field(description="the mask as sent")
    height: int
    resampled: bool = Field(description="true when the mask was not the photo's size and was resampled to it")
    resampled_to: ImageSize | None = Field(description="the photo's size, when resampled")
    resampling: Literal["nearest-neighbour"] | None
    lesion_pixels: int = Field(description="lesion pixels at the photo's size")


class LesionRegion(BaseModel):
    class_index: int
    label: str
    region_pixels: int = Field(description="pixels of this region in the label map")
    lesion_pixels: int = Field(description="of those, how many the lesion mask covers")
    lesion_percent: float = Field(description="100 * lesion_pixels / region_pixels")


class TbsaRegionOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    region: str
    view: str
    chart_percent: float = Field(description="the region's share of the body surface in the chart")
    visible_share: float = Field(description="share of the region's surface seen as skin (not covered)")
    lesion_share: float | None = Field(description="share of the visible skin with lesion; null: no skin seen")
    contribution_percent: float = Field(description="the region's part of percent")


class TbsaOut(BaseModel):
    """The %TBSA estimate of :mod:`dicom_node.parse.tbsa` (an estimate from photos, not for diagnosis)."""

    model_config = ConfigDict(extra="allow")
    method: str
    age_group: str
    age_years: float | None
    view: str = Field(description="anterior, posterior or both")
    percent: float = Field(description="estimated % of total body surface area with lesion")
    visible_percent: float = Field(description="% of the body surface seen as skin in the photo")
    regions: list[TbsaRegionOut]
    warnings: list[str]
    note: str = Field(description="estimate from 2-D photos, not for diagnosis")


class LesionAnswer(BaseModel):
    parsing_id: str
    lesion: list[LesionRegion] = Field(description="per body region present: how much of it the mask covers")
    tbsa: TbsaOut
    lesion_mask: MaskInfo
    compute_s: float = Field(description="seconds spent on the figures (no network is run)")


class StudyTbsaRequest(BaseModel):
    """Several kept parsings of one patient in one study (front and back) for one %TBSA estimate."""

    model_config = ConfigDict(extra="forbid")
    parsings: list[Annotated[str, StringConstraints(pattern=PARSING_ID_PATTERN)]] = Field(
        description="the parsing ids /api/predict returned, each with a lesion mask sent; 1 to 8, each once",
        examples=[["front-parsing-id-0123456789", "back-parsing-id-0123456789"]])
    age_years: float | None = Field(default=None, ge=0, le=130,
                                    description="patient age in years; default: the first DICOM photo's that "
                                                "says, else unknown (adult chart, with a warning)")
    method: Literal["lund-browder", "rule-of-nines"] | None = Field(default=None,
                                                                    description="%TBSA chart; default lund-browder")


class StudyPhotoOut(BaseModel):
    parsing: str = Field(description="the parsing id")
    source: str = Field(description="the uploaded file's name")
    view: Literal["anterior", "posterior"] = Field(description="the side of the body it is counted as")
    view_from: Literal["request", "dicom", "assumed"] = Field(
        description="request: the view sent with its latest lesion mask; dicom: the photo's View Code Sequence; "
                    "assumed: neither said, taken as anterior (a warning says so)")


class StudyTbsaAnswer(TbsaOut):
    """The %TBSA of one study's photos pooled: each view contributes its half of the chart."""

    age_from: Literal["request", "dicom", "unknown"] = Field(description="where age_years came from")
    photos: list[StudyPhotoOut] = Field(description="the photos combined, in the order named; the warnings call "
                                                    "them photo 1, photo 2, ...")


class ParseMetadata(BaseModel):
    """Also sent, compact, in the ``X-Parse-Metadata`` header of the PNG answer."""

    status: Literal["ok"]
    source: str = Field(description="the uploaded file's name")
    image_size: ImageSize
    inference_s: float | None = Field(description="seconds from preprocessing to label map")
    person_count: int
    labels_present: list[str]
    regions: list[RegionStatistics]
    model: ModelInfo
    warning: str | None = Field(default=None, description="present when the model is untrained")
    parsing: KeptParsingOut | None = Field(default=None, description="where to send lesion masks for this parsing")
    lesion_mask: MaskInfo | None = Field(default=None, description="present when a lesion mask was sent")


class ParseImages(BaseModel):
    color_png: str = Field(description="base64 PNG: every pixel in its class colour")
    overlay_png: str = Field(description="base64 PNG: the photo tinted by class, with a legend")
    original_png: str | None = Field(default=None, description="base64 PNG of the decoded photo "
                                                                 "(with include_original=true)")


class ParseAnswer(BaseModel):
    status: Literal["ok"]
    metadata: ParseMetadata
    report: dict[str, Any] = Field(description="the parse report, as `dicom-node parse` writes it to JSON")
    images: ParseImages


class UploadInfo(BaseModel):
    max_upload_bytes: int = Field(description="larger uploads are refused with 413")
    max_pixels: int = Field(description="photos with more pixels are refused with 413")
    formats: list[str]
    model_loaded: bool = Field(description="false until the first parse (or a failed load) on this server")


class ClassInfo(BaseModel):
    index: int
    name: str
    color: list[int] = Field(description="RGB, as in the colour PNG, the overlay and the SEG")


# --------------------------------------------------------------------------- jobs


class ResultObjectOut(BaseModel):
    kind: str = Field(description="seg, sc or sr")
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class DeliveryOut(BaseModel):
    destination: str
    sop_instance_uid: str


class JobEventOut(BaseModel):
    at: float = Field(description="epoch seconds")
    from_state: JobState | None
    to_state: JobState
    reason: str | None


class JobOut(BaseModel):
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    calling_host: str
    state: JobState
    attempts: int = Field(description="processing attempts started")
    dispatch_attempts: int = Field(description="failed dispatch attempts since the results were made")
    not_before: float | None = Field(description="epoch seconds: no attempt before this time")
    reason: str | None = Field(description="why it failed, or how it ended")
    destinations: list[str]
    rule: str | None
    parse_s: float | None
    received_at: float = Field(description="epoch seconds")
    updated_at: float = Field(description="epoch seconds")
    results: list[ResultObjectOut]
    deliveries: list[DeliveryOut]

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id, sop_instance_uid=job.sop_instance_uid, sop_class_uid=job.sop_class_uid,
            transfer_syntax_uid=job.transfer_syntax_uid, calling_ae=job.calling_ae, calling_host=job.calling_host,
            state=job.state, attempts=job.attempts, dispatch_attempts=job.dispatch_attempts,
            not_before=job.not_before, reason=job.reason, destinations=list(job.destinations), rule=job.rule,
            parse_s=job.parse_s, received_at=job.received_at, updated_at=job.updated_at,
            results=[ResultObjectOut(kind=r.kind, sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid,
                                     transfer_syntax_uid=r.transfer_syntax_uid) for r in job.results],
            deliveries=[DeliveryOut(destination=d, sop_instance_uid=u) for d, u in sorted(job.deliveries)],
        )


class JobDetail(JobOut):
    history: list[JobEventOut]

    @classmethod
    def with_history(cls, job: Job, history: list[JobEvent]) -> JobDetail:
        events = [JobEventOut(at=e.at, from_state=e.from_state, to_state=e.to_state, reason=e.reason)
                  for e in history]
        return cls(**JobOut.of(job).model_dump(), history=events)


class JobPage(BaseModel):
    jobs: list[JobOut] = Field(description="newest first")
    counts: dict[str, int] = Field(description="jobs per state in the whole store")
    total: int = Field(description="jobs matching the filter")
    limit: int
    offset: int


# --------------------------------------------------------------------------- health


class Alive(BaseModel):
    status: Literal["alive"]


class CheckOut(BaseModel):
    ok: bool
    detail: str


class ReadinessOut(BaseModel):
    ready: bool
    checks: dict[str, CheckOut]
