"""DICOMweb in: the STOW-RS Store transaction (PS3.18 10.5), ``POST /dicom-web/studies[/{study}]``.

A DICOMweb client stores photos here as a modality stores them by C-STORE, with the same promises:
every instance goes through the node's one :class:`~dicom_node.intake.accept.Acceptor` (accepted SOP
classes and transfer syntaxes, header checks, duplicate check, disk watermark), and the answer says
"stored" only once the photo is in the spool (atomic, fsynced) and its job is committed.

* Request: ``Content-Type: multipart/related; type="application/dicom"; boundary=...``, one DICOM
  Part 10 file per part (PS3.18 10.5.1.4, 8.6.1); metadata + bulk data representations are not
  taken (415). The body is bounded by ``http.max_upload_bytes`` (413).
* Who: DICOMweb clients are callers like any other, under the calling AE title
  ``http.dicomweb_calling_ae`` (``DICOMWEB``): a ``[[callers]]`` entry with that title admits them
  (its ``host`` pin is matched against the HTTP client's address, so behind a reverse proxy pin the
  proxy), its ``return_to`` is where '@sender' sends their results, and routing rules can name it.
  Without such an entry the transaction is refused with 403, as an unknown AE's association is
  rejected. The bearer-token rule is the rest of the API's (:mod:`dicom_node.web.auth`).
* Response: a Store Instances Response Module (PS3.18 10.5.3, Annex I) in DICOM JSON
  (``application/dicom+json``): Referenced SOP Sequence for stored instances, Failed SOP Sequence
  with each refusal's DICOM status as Failure Reason (and the Error Comment a C-STORE-RSP would
  carry), Other Failures Sequence for parts that name no usable SOP instance. HTTP 200 when all were
  stored, 202 when some were, 409 when none was (PS3.18 Table 10.5.3-1). Retrieve URL is empty (Type 2):
  the node keeps no archive to retrieve from.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from dicom_node.config import HttpSettings, Peers
from dicom_node.intake.accept import Acceptor, Outcome, Received
from dicom_node.intake.checks import Refusal, uid_problem
from dicom_node.logs import fields
from dicom_node.monitor.metrics import SOURCE_DICOMWEB
from dicom_node.net import status
from dicom_node.web.errors import error_json
from dicom_node.web.uploads import too_large

log = logging.getLogger(__name__)

STUDIES_PATH = "/dicom-web/studies"
DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON_MEDIA_TYPE = "application/dicom+json"
# What a client may ask for in Accept and get the DICOM JSON answer (PS3.18 8.7.3.2: its default).
_ANSWERS_ACCEPTED = frozenset({DICOM_JSON_MEDIA_TYPE, "application/json", "application/*", "*/*"})
INTAKE_THREADS = 4  # fixed threads: the job store keeps one connection per thread
PART10_PREFIX_END = 132  # 128-byte preamble + "DICM" (PS3.10 7.1)
FILE_META_MAX_BYTES = 64 * 1024  # a File Meta group is a few hundred bytes; more is not a Part 10 file
HEADER_WINDOW_BYTES = 1024 * 1024  # how much of a data set is read to find its Study Instance UID
_STUDY_INSTANCE_UID = 0x0020000D
_ERROR_COMMENT = 0x00000902  # (0000,0902), as in the C-STORE-RSP (PS3.7 Annex C)

StudyUid = Annotated[str, Path(min_length=1, max_length=64, description="Study Instance UID the instances belong to")]


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _BadRequest(Exception):
    status_code: int
    code: str
    message: str

    def response(self) -> Response:
        return error_json(self.status_code, self.code, self.message)


class StowRs:
    """The STOW-RS route over a node's acceptor; :meth:`close` when the app stops."""

    def __init__(self, acceptor: Acceptor, peers: Peers, settings: HttpSettings) -> None:
        self.acceptor = acceptor
        self.peers = peers
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=INTAKE_THREADS, thread_name_prefix="dicomweb-intake")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def router(self) -> APIRouter:
        router = APIRouter(tags=["DICOMweb"])
        responses: dict[int | str, dict[str, object]] = {
            200: {"description": "every instance stored (spooled and committed)"},
            202: {"description": "some instances stored, the others in Failed SOP Sequence"},
            409: {"description": "no instance stored; the reasons in Failed SOP / Other Failures Sequence"},
            401: {"description": "bearer token required"},
            403: {"description": "no [[callers]] entry for DICOMweb clients from this address"},
            413: {"description": "body larger than http.max_upload_bytes"},
            415: {"description": "not multipart/related; type=\"application/dicom\""},
        }

        @router.post(STUDIES_PATH, responses=responses, response_class=Response,
                     summary="STOW-RS: store VL photos for parsing (PS3.18 10.5)")
        async def store_instances(request: Request) -> Response:
            return await self.store(request, None)

        @router.post(STUDIES_PATH + "/{study}", responses=responses, response_class=Response,
                     summary="STOW-RS to one study: instances of another Study Instance UID are refused")
        async def store_study_instances(request: Request, study: StudyUid) -> Response:
            return await self.store(request, study)

        return router

    async def store(self, request: Request, study: str | None) -> Response:
        """Read the multipart body, hand each part to the acceptor, answer the Store Instances Response."""
        host = request.client.host if request.client is not None else ""
        calling_ae = self.settings.dicomweb_calling_ae
        try:
            self._check_request(request, study, calling_ae, host)
            parts = await self._read_parts(request)
        except _BadRequest as refused:
            return refused.response()
        outcomes: list[Outcome] = []
        loop = asyncio.get_running_loop()
        while parts:
            part = parts.pop(0)  # each part's bytes go as soon as it is stored
            outcomes.append(await loop.run_in_executor(self._pool, self._store_part, part, study, calling_ae, host))
        stored = sum(o.stored for o in outcomes)
        log.info(fields(event="dicomweb.stow", calling_ae=calling_ae, host=host, study=study, instances=len(outcomes),
                        stored=stored, failed=len(outcomes) - stored))
        code = 200 if stored == len(outcomes) else 202 if stored else 409
        return JSONResponse(store_instances_response(outcomes), status_code=code, media_type=DICOM_JSON_MEDIA_TYPE)

    # ------------------------------------------------------------------ the request

    def _check_request(self, request: Request, study: str | None, calling_ae: str, host: str) -> None:
        headers = request.headers
        accept = headers.get("accept")
        if accept and not any(r.split(";")[0].strip().lower() in _ANSWERS_ACCEPTED for r in accept.split(",")):
            raise _BadRequest(406, "not_acceptable", f"the Store Instances Response is sent as {DICOM_JSON_MEDIA_TYPE}")
        media_type, params = parse_options_header(headers.get("content-type", ""))
        if media_type != b"multipart/related":
            raise _BadRequest(415, "unsupported_media_type",
                              f'send multipart/related; type="{DICOM_MEDIA_TYPE}", one DICOM Part 10 file per part')
        part_type = params.get(b"type", DICOM_MEDIA_TYPE.encode()).decode("latin-1").strip().lower()
        if part_type != DICOM_MEDIA_TYPE:
            raise _BadRequest(415, "unsupported_media_type",
                              f"only {DICOM_MEDIA_TYPE} instances are stored here, not {part_type[:64]}")
        if not params.get(b"boundary"):
            raise _BadRequest(400, "bad_request", "the multipart/related Content-Type has no boundary parameter")
        if study is not None and uid_problem(study) is not None:
            raise _BadRequest(400, "bad_request", f"the Study Instance UID in the path {uid_problem(study)}")
        if self.peers.caller(calling_ae, host) is None:
            log.warning(fields(event="intake.rejected", calling_ae=calling_ae, host=host, source=SOURCE_DICOMWEB,
                               reason="no [[callers]] entry with http.dicomweb_calling_ae admits this address"))
            self.acceptor.metrics.rejected("calling_ae_not_recognised", SOURCE_DICOMWEB)
            raise _BadRequest(403, "forbidden",
                              f"DICOMweb clients are callers with the AE title {calling_ae}: no [[callers]] entry "
                              f"with ae_title = \"{calling_ae}\" admits {host}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_upload_bytes:
            raise _BadRequest(413, "too_large", too_large(self.settings.max_upload_bytes).message)

    async def _read_parts(self, request: Request) -> list[_Part]:
        """The body's parts, read as the body streams in (python-multipart parses any multipart
        subtype by its boundary, RFC 2046); more than ``max_upload_bytes`` stops the read with 413."""
        _, params = parse_options_header(request.headers.get("content-type", ""))
        parts: list[_Part] = []
        header_field = bytearray()
        header_value = bytearray()

        def on_part_begin() -> None:
            parts.append(_Part())
            header_field.clear()
            header_value.clear()

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header_field.extend(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header_value.extend(data[start:end])

        def on_header_end() -> None:
            parts[-1].headers[header_field.decode("latin-1").strip().lower()] = header_value.decode("latin-1").strip()
            header_field.clear()
            header_value.clear()

        def on_part_data(data: bytes, start: int, end: int) -> None:
            parts[-1].data.extend(data[start:end])

        parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_part_data": on_part_data})
        limit = self.settings.max_upload_bytes
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise _BadRequest(413, "too_large", too_large(limit).message)
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise _BadRequest(400, "bad_request", f"the multipart body cannot be read: {exc}") from None
        if parser.state != MultipartState.END:
            raise _BadRequest(400, "bad_request", "the multipart body ends before its closing boundary")
        if not parts:
            raise _BadRequest(400, "bad_request", "the multipart body holds no part")
        return parts

    # ------------------------------------------------------------------ one part (in the intake pool)

    def _store_part(self, part: _Part, study: str | None, calling_ae: str, host: str) -> Outcome:
        def refuse(refusal: Refusal, sop_instance_uid: str = "", sop_class_uid: str = "") -> Outcome:
            return self.acceptor.refuse(None, refusal, sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                                        calling_ae=calling_ae, source=SOURCE_DICOMWEB)

        media_type, _ = parse_options_header(part.headers.get("content-type", DICOM_MEDIA_TYPE))
        if media_type.decode("latin-1").lower() != DICOM_MEDIA_TYPE:
            return refuse(Refusal(status.CANNOT_UNDERSTAND, "not_a_dataset", f"part is not {DICOM_MEDIA_TYPE}",
                                  f"a part of type {media_type.decode('latin-1')[:64]!r}, not {DICOM_MEDIA_TYPE}"))
        data = part.data
        meta = _read_file_meta(data)
        if isinstance(meta, Refusal):
            return refuse(meta)
        meta_ds, data_set_offset = meta
        transfer_syntax = _uid_text(meta_ds, "TransferSyntaxUID")
        sop_class = _uid_text(meta_ds, "MediaStorageSOPClassUID")
        sop_instance = _uid_text(meta_ds, "MediaStorageSOPInstanceUID")
        for name, tag, value in (("Media Storage SOP Instance UID", "(0002,0003)", sop_instance),
                                 ("Media Storage SOP Class UID", "(0002,0002)", sop_class),
                                 ("Transfer Syntax UID", "(0002,0010)", transfer_syntax)):
            problem = uid_problem(value)
            if problem is not None:
                known = uid_problem(sop_instance) is None
                return refuse(Refusal(status.CANNOT_UNDERSTAND, "invalid_file_meta", f"{name} {problem}",
                                      f"the File Meta's {name} {tag} {problem}", omit_instance_uid=not known),
                              sop_instance if known else "", sop_class if uid_problem(sop_class) is None else "")
        data_set = BytesIO(memoryview(data)[data_set_offset:])
        part.data = bytearray()  # the data set's copy is all that is kept
        if study is not None:
            found = _study_instance_uid(data_set, UID(transfer_syntax))
            if found != study:
                comment = ("Study Instance UID cannot be read" if found is None
                           else "Study Instance UID differs from the target study's")
                return refuse(Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS if found else status.CANNOT_UNDERSTAND,
                                      "study_mismatch" if found else "study_unreadable", comment,
                                      f"{comment} (STOW-RS to /studies/{study}, PS3.18 10.5.1.1.1)"),
                              sop_instance, sop_class)
        return self.acceptor.accept(Received(
            data_set=data_set, transfer_syntax=transfer_syntax, declared_sop_class=sop_class, sop_class_uid=sop_class,
            sop_instance_uid=sop_instance, calling_ae=calling_ae, calling_host=host, source=SOURCE_DICOMWEB))


def store_instances_response(outcomes: list[Outcome]) -> dict[str, object]:
    """The Store Instances Response Module (PS3.18 Annex I) in DICOM JSON (PS3.18 Annex F)."""
    response = Dataset()
    response.RetrieveURL = ""  # Type 2: nothing here can be retrieved
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    other: list[Dataset] = []
    for outcome in outcomes:
        if outcome.stored:
            item = _reference(outcome)
            item.RetrieveURL = ""
            referenced.append(item)
            continue
        item = _reference(outcome) if _referenceable(outcome) else Dataset()
        item.FailureReason = outcome.status
        comment = outcome.error_comment
        if comment:
            item.add_new(_ERROR_COMMENT, "LO", comment)
        (failed if _referenceable(outcome) else other).append(item)
    if failed:
        response.FailedSOPSequence = failed
    if referenced:
        response.ReferencedSOPSequence = referenced
    if other:
        response.OtherFailuresSequence = other
    return response.to_json_dict()


def _referenceable(outcome: Outcome) -> bool:
    """Whether a refused instance can be named in Failed SOP Sequence (valid UIDs, never one the
    checks said not to echo); otherwise it goes to Other Failures Sequence."""
    if outcome.refusal is not None and outcome.refusal.omit_instance_uid:
        return False
    return uid_problem(outcome.sop_instance_uid) is None and uid_problem(outcome.sop_class_uid) is None


def _reference(outcome: Outcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    return item


def _not_part10(comment: str, detail: str) -> Refusal:
    return Refusal(status.CANNOT_UNDERSTAND, "not_a_dataset", comment, detail)


def _read_file_meta(data: bytearray) -> tuple[Dataset, int] | Refusal:
    """The File Meta Information of a Part 10 file (PS3.10 7.1) and where its data set starts."""
    if len(data) < PART10_PREFIX_END or data[128:PART10_PREFIX_END] != b"DICM":
        return _not_part10("not a DICOM Part 10 file", "the part is not a DICOM Part 10 file (no 'DICM' after "
                           "the 128-byte preamble, PS3.10 7.1)")
    window = bytes(data[PART10_PREFIX_END:PART10_PREFIX_END + FILE_META_MAX_BYTES])
    stream = BytesIO(window)

    def past_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group != 0x0002

    try:  # the File Meta group is always Explicit VR Little Endian (PS3.10 7.1)
        meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=past_group_2)
    except Exception as exc:  # whatever pydicom makes of bytes that are not a File Meta group
        return _not_part10("File Meta Information cannot be read",
                           f"the File Meta Information cannot be read: {type(exc).__name__}")
    end = stream.tell()
    if end >= len(window) and len(data) > PART10_PREFIX_END + len(window):
        return _not_part10("File Meta Information too long", f"File Meta Information longer than "
                           f"{FILE_META_MAX_BYTES} bytes")
    return meta, PART10_PREFIX_END + end


def _uid_text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).rstrip("\x00 ")


def _study_instance_uid(data_set: BytesIO, transfer_syntax: UID) -> str | None:
    """The data set's Study Instance UID (0020,000D), read from its first bytes; None when they
    cannot be read as a data set or hold none."""
    with data_set.getbuffer() as buffer:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:  # PS3.5 A.5: raw deflate
            try:
                head = zlib.decompressobj(-zlib.MAX_WBITS).decompress(buffer, HEADER_WINDOW_BYTES)
            except zlib.error:
                return None
        else:
            head = bytes(buffer[:HEADER_WINDOW_BYTES])

    def past_study_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag > _STUDY_INSTANCE_UID

    try:
        ds = read_dataset(BytesIO(head), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=past_study_uid, defer_size=64 * 1024)
        value = ds.get(_STUDY_INSTANCE_UID)
    except Exception:
        return None
    if value is None or value.value is None:
        return None
    text = value.value.decode("ascii", "replace") if isinstance(value.value, bytes) else str(value.value)
    return text.rstrip("\x00 ") or None
