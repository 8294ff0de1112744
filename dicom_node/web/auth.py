"""Bearer-token access control, on when the HTTP port is bound to anything but loopback.

Bound to 127.0.0.1 (the default) only this machine can connect and nothing is asked. Bound
elsewhere, every request except ``/healthz`` (and the login page, which holds nothing) must carry
the configured token: API clients send ``Authorization: Bearer <token>``; a browser signs in once
at ``/login`` and then sends it in an HttpOnly, SameSite=Strict cookie, so pages and their scripts
never hold the token. Put a TLS proxy in front when the network is not trusted: the token travels
in every request.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.config import HttpSettings

COOKIE_NAME = "dicom_node_token"
PUBLIC_PATHS = frozenset({"/healthz", "/login", "/static/style.css", "/static/login.js"})
# Paths a browser navigates to; anything else answers 401 JSON to an unauthenticated request.
_PAGE_PATHS = frozenset({"/", "/dashboard", "/index.html", "/dashboard.html"})


def _presented_token(headers: Headers) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME and value:
            return value
    return None


def token_matches(presented: str | None, expected: str) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))


class BearerTokenMiddleware:
    """ASGI middleware: refuse requests without the token (401 JSON, or a redirect to /login for pages)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if token_matches(_presented_token(headers), self.token):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD") and path in _PAGE_PATHS:
            response: Response = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        else:
            body = {"error": "unauthorized", "message": "this node requires a bearer token (Authorization: Bearer ...)"}
            response = Response(json.dumps(body), status_code=401, media_type="application/json",
                                headers={"WWW-Authenticate": 'Bearer realm="dicom_node"'})
        await response(scope, receive, send)


def _safe_next(target: str | None) -> str:
    """Only redirect to a path on this server (never to another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def login_router(settings: HttpSettings, login_page: str) -> APIRouter:
    """``GET /login`` (the form) and ``POST /login`` / ``POST /logout`` (set or clear the cookie)."""
    router = APIRouter(include_in_schema=False)
    expected = settings.token.get_secret_value().strip() if settings.token is not None else None

    @router.get("/login")
    def login_form() -> Response:
        if expected is None:
            return RedirectResponse("/", status_code=303)
        return FileResponse(login_page, headers={"Cache-Control": "no-store"})

    @router.post("/login")
    def login(request: Request, token: str = Form(""), next_path: str = Form("/", alias="next")) -> Response:
        if expected is None:
            return RedirectResponse(_safe_next(next_path), status_code=303)
        if not token_matches(token.strip(), expected):
            return RedirectResponse(f"/login?failed=1&next={quote(_safe_next(next_path))}", status_code=303)
        response = RedirectResponse(_safe_next(next_path), status_code=303)
        response.set_cookie(COOKIE_NAME, expected, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @router.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login" if expected else "/", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    return router
