"""Every error the HTTP side returns is JSON: ``{"error": "<code>", "message": "<for a person>"}``.

Request validation failures are 400 (not FastAPI's 422): for a client, a missing field and an
unreadable photo are the same kind of mistake. Anything unexpected is a 500 with a generic message
and the details in the log, never a traceback in the response.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node.logs import fields
from dicom_node.web.parsing import ModelUnavailableError, ParserBusyError
from dicom_node.web.schemas import ErrorBody
from dicom_node.web.uploads import UploadError, too_large

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=code, message=message).model_dump(), status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, max_upload_bytes: int) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_json(400, "bad_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        phrase = _phrase(status)
        code = _CODES.get(status, phrase.lower().replace(" ", "_"))
        message = str(exc.detail) if exc.detail else phrase
        if status == 413:
            message = too_large(max_upload_bytes).message
        return error_json(status, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(UploadError)
    async def _upload(request: Request, exc: UploadError) -> JSONResponse:
        return error_json(exc.status, exc.code, exc.message)

    @app.exception_handler(ModelUnavailableError)
    async def _model(request: Request, exc: ModelUnavailableError) -> JSONResponse:
        return error_json(503, "model_unavailable", str(exc), headers={"Retry-After": "30"})

    @app.exception_handler(ParserBusyError)
    async def _busy(request: Request, exc: ParserBusyError) -> JSONResponse:
        return error_json(503, "busy", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(fields(event="http.error", method=request.method, path=request.url.path,
                         reason=f"{type(exc).__name__}: {exc}"), exc_info=exc)
        return error_json(500, "internal_error", "internal error; the node's log has the details")
