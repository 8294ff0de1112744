"""The node's HTTP side in one FastAPI app: REST API, web UI, health, readiness and metrics.

:func:`create_app` takes everything it serves from the outside (parser, job store, readiness,
metrics, settings), so the node mounts it over its own objects and tests over small ones.
The OpenAPI document is served at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.config import HttpSettings, Peers
from dicom_node.intake.accept import Acceptor
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.monitor.readiness import Readiness
from dicom_node.queue.store import JobStore
from dicom_node.web.api import (
    LESION_PATH_PATTERN,
    PREDICT_PATH,
    WebContext,
    health_router,
    jobs_router,
    parse_router,
    parsings_router,
)
from dicom_node.web.auth import BearerTokenMiddleware, login_router
from dicom_node.web.dicomweb import StowRs
from dicom_node.web.errors import install_error_handlers
from dicom_node.web.lesion import SWEEP_INTERVAL_S, ParsingStore
from dicom_node.web.parsing import ParserProvider
from dicom_node.web.uploads import UploadLimit

STATIC_DIR = Path(__file__).parent / "static"
API_VERSION = "1.0.0"
# The pages load only their own files; images come from blob: URLs made of the API's answers.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def create_app(
    parser_provider: ParserProvider,
    job_store: JobStore | None,
    readiness: Readiness,
    metrics: NodeMetrics,
    settings: HttpSettings,
    acceptor: Acceptor | None = None,
    peers: Peers | None = None,
) -> FastAPI:
    """The app; with ``acceptor`` and ``peers`` (a running node's) it also takes photos by STOW-RS
    at ``/dicom-web/studies`` (:mod:`dicom_node.web.dicomweb`)."""
    ctx = WebContext(parser_provider, job_store, readiness, metrics, settings)
    stow = StowRs(acceptor, peers, settings) if acceptor is not None and peers is not None else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_kept_parsings(ctx.parsings))
        try:
            yield
        finally:
            sweeper.cancel()
            ctx.parsings.clear()  # photos' parsings never outlive the server
        ctx.close()
        if stow is not None:
            stow.close()

    app = FastAPI(
        lifespan=lifespan,
        title="dicom_node",
        version=API_VERSION,
        summary="M2FP human parsing of body photographs: REST API, jobs, health and metrics",
        openapi_url="/openapi.json",
        docs_url=None,  # Swagger UI loads its scripts from a CDN, which a hospital network rarely reaches
        redoc_url=None,
    )
    app.state.web = ctx
    install_error_handlers(app, settings.max_upload_bytes)
    app.include_router(parse_router(ctx))
    app.include_router(parsings_router(ctx))
    app.include_router(jobs_router(ctx))
    app.include_router(health_router(ctx))
    if stow is not None:
        app.include_router(stow.router())
    app.include_router(login_router(settings, str(STATIC_DIR / "login.html")))
    _add_pages(app)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes, paths=(PREDICT_PATH,),
                       path_pattern=LESION_PATH_PATTERN)
    if settings.auth_required:
        assert settings.token is not None  # HttpSettings refuses an open bind without one
        app.add_middleware(BearerTokenMiddleware, token=settings.token.get_secret_value().strip())
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, refusals included

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = tidy_openapi(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _sweep_kept_parsings(store: ParsingStore) -> None:
    """Drop expired parsings even when nobody asks for them: PHI is kept no longer than its time."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        store.sweep()


class SecurityHeaders:
    """ASGI middleware: headers that keep the UI from being framed, sniffed or made to run foreign scripts."""

    HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _add_pages(app: FastAPI) -> None:
    """The web UI: plain HTML, CSS and JavaScript files, no build step."""

    def page(name: str) -> Response:
        return FileResponse(STATIC_DIR / name, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", lambda: page("index.html"), methods=["GET"], include_in_schema=False)
    app.add_api_route("/dashboard", lambda: page("dashboard.html"), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def tidy_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Document what the app really answers: validation errors are 400 ErrorBody, not 422."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            if "422" in responses and "HTTPValidationError" in repr(responses["422"]):
                del responses["422"]
                responses.setdefault("400", {
                    "description": "invalid request",
                    "content": {"application/json": {"schema": _ERROR_REF}},
                })
    components = schema.get("components", {}).get("schemas", {})
    text = repr(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in components and f"/{unused}'" not in text:
            del components[unused]
    return schema
