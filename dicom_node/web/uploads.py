"""Uploaded photos: size limits, format sniffing and decoding through :mod:`dicom_node.decode.photo`.

Only JPEG, PNG and DICOM are accepted, told apart by their first bytes rather than by the name or
the declared content type (both are whatever the client says). JPEG and PNG go through
:func:`~dicom_node.decode.photo.load_photo`, so an upload gives the model exactly the pixels the CLI
and the M2FP pipeline get from the same file; DICOM goes through
:func:`~dicom_node.decode.photo.photo_from_dataset`, as a received C-STORE does.

Every refusal is an :class:`UploadError` carrying the HTTP status and a message for the person who
uploaded: 413 too large, 415 not a format we take, 400 damaged or otherwise unusable.
"""

from __future__ import annotations

import os
import re
import tempfile
from io import BytesIO

import pydicom
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.decode.errors import CorruptPhotoError, PhotoError, UnsupportedPhotoError
from dicom_node.decode.photo import Photo, load_photo, photo_from_dataset
from dicom_node.web.schemas import ErrorBody

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DICOM_PREAMBLE_LENGTH = 128
DICOM_MAGIC = b"DICM"

_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f\"\\/]+")
_MAX_NAME_LENGTH = 200


class UploadError(Exception):
    """An upload that cannot be parsed, with the HTTP status that says why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def too_large(max_bytes: int) -> UploadError:
    return UploadError(413, "too_large", f"the upload is larger than this node's limit of {format_bytes(max_bytes)}")


def safe_filename(name: str | None, default: str = "upload") -> str:
    """The last path component of a client-supplied name, without control characters or quotes."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = _UNSAFE_NAME_CHARS.sub("_", base).strip(" .")
    return base[:_MAX_NAME_LENGTH] or default


def sniff_format(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"``, ``"dicom"`` (Part 10 with preamble) or None (maybe a bare DICOM dataset)."""
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[DICOM_PREAMBLE_LENGTH:DICOM_PREAMBLE_LENGTH + 4] == DICOM_MAGIC:
        return "dicom"
    return None


def photo_from_upload(data: bytes, filename: str, max_pixels: int) -> Photo:
    """Decode an uploaded JPEG, PNG or DICOM photo; raise :class:`UploadError` if it cannot be used."""
    if not data:
        raise UploadError(400, "empty_upload", "the uploaded file is empty")
    kind = sniff_format(data)
    try:
        if kind is None:
            dataset = _bare_dicom(data)
            if dataset is None:
                raise UploadError(415, "unsupported_media_type",
                                  "only JPEG, PNG and DICOM photos are accepted; this file is none of them")
            photo = photo_from_dataset(dataset, max_pixels, source=filename)
        else:
            photo = _load_file(data, filename, kind, max_pixels)
    except PhotoError as exc:
        raise _photo_error(exc) from exc
    return Photo(rgb=photo.rgb, dataset=photo.dataset, source=filename)


def _load_file(data: bytes, filename: str, kind: str, max_pixels: int) -> Photo:
    # load_photo reads paths; a private temporary file keeps its exact decoding (EXIF rotation included)
    suffix = {"jpeg": ".jpg", "png": ".png", "dicom": ".dcm"}[kind]
    handle, path = tempfile.mkstemp(prefix="dicom-node-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as fh:
            fh.write(data)
        try:
            return load_photo(path, max_pixels)
        except PhotoError as exc:
            # name the upload, not our temporary file, in what the user reads
            raise type(exc)(exc.reason.replace(path, filename), filename) from exc
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _bare_dicom(data: bytes) -> Dataset | None:
    """A DICOM dataset without the Part 10 preamble, or None when the bytes are not one."""
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=True)
        if len(dataset) > 0 and ("PixelData" in dataset or "SOPClassUID" in dataset):
            return dataset
    except Exception:
        pass  # not DICOM, whatever pydicom made of it
    return None


def _photo_error(exc: PhotoError) -> UploadError:
    reason = exc.reason
    if isinstance(exc, UnsupportedPhotoError):
        if reason.startswith("image too large"):
            return UploadError(413, "too_many_pixels", reason)
        return UploadError(415, "unsupported_photo", reason)
    if isinstance(exc, CorruptPhotoError) and "neither DICOM nor an image format" in reason:
        return UploadError(415, "unsupported_media_type", reason)
    return UploadError(400, "corrupt_photo", reason)


class UploadLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` on ``paths`` with a JSON 413, before parsing.

    A declared Content-Length over the limit is answered at once, without reading the body; a body
    that grows past it (chunked, or a Content-Length that lies) stops the read with an
    ``HTTPException(413)``, which FastAPI hands to the app's JSON error handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...], envelope_bytes: int = 64 * 1024,
                 path_pattern: str | None = None) -> None:
        """``path_pattern``: a regular expression for paths with parameters (matched whole)."""
        self.app = app
        self.max_bytes = max_bytes
        self.limit = max_bytes + envelope_bytes  # the multipart envelope around the photo adds a little
        self.paths = paths
        self.pattern = re.compile(path_pattern) if path_pattern else None

    def _limited(self, path: str) -> bool:
        return path in self.paths or (self.pattern is not None and self.pattern.fullmatch(path) is not None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._limited(scope["path"]):
            await self.app(scope, receive, send)
            return
        error = too_large(self.max_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = ErrorBody(error=error.code, message=error.message).model_dump()
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, error.message)
            return message

        await self.app(scope, limited_receive, send)
