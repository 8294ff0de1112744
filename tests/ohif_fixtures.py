"""The real OHIF viewer for the browser tests: the npm package's ``dist/``, served beside Orthanc's DICOMweb.

``@ohif/app`` on npm ships a complete, built viewer in ``package/dist/``; nothing is built here. It is
fetched once with ``npm pack`` into a cache outside the checkout (``$DICOM_NODE_TEST_CACHE``, else
``$XDG_CACHE_HOME/dicom_node``, else ``~/.cache/dicom_node``), checked against the registry's integrity
digest and unpacked; ``scripts/setup.sh --test`` pre-fetches it so the tests need no registry.

:class:`OhifServer` is one origin for the browser: ``dist/`` at the root (the build expects
``PUBLIC_URL=/``), every path that is no file answered with ``index.html`` (the viewer's client-side
routes such as ``/viewer``), a generated ``app-config.js`` whose one data source is ``/dicom-web`` on
the same origin, and ``/dicom-web/*`` passed through to Orthanc with the browser's Host header, so the
BulkDataURIs Orthanc writes into its metadata point back at this origin. Same origin: no CORS involved.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
# the registry's dist.integrity of @ohif/app@3.13.2 (`npm view @ohif/app@3.13.2 dist.integrity`)
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
NPM_TIMEOUT_S = 300.0
DICOMWEB_PREFIX = "/dicom-web"
PROXY_TIMEOUT_S = 60.0

# hop-by-hop headers (RFC 9110 7.6.1) are never forwarded by a proxy
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript",
    ".css": "text/css; charset=utf-8", ".json": "application/json", ".wasm": "application/wasm",
    ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".woff": "font/woff",
    ".woff2": "font/woff2", ".ttf": "font/ttf", ".map": "application/json", ".txt": "text/plain",
    ".webmanifest": "application/manifest+json", ".gz": "application/gzip",
}


class OhifUnavailableError(RuntimeError):
    """The OHIF package is not cached and could not be fetched (npm missing or the registry unreachable)."""


def cache_root() -> Path:
    """Where downloaded test assets live: outside the checkout, shared by every checkout of the machine."""
    explicit = os.environ.get("DICOM_NODE_TEST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dicom_node"


def _sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm_pack(into: Path) -> Path:
    spec = f"{OHIF_PACKAGE}@{OHIF_VERSION}"
    npm = shutil.which("npm")
    if npm is None:
        raise OhifUnavailableError(f"{spec} is not cached in {cache_root()} and npm is not installed "
                                   "(scripts/setup.sh --test installs it and pre-fetches the viewer)")
    try:
        done = subprocess.run([npm, "pack", spec, "--pack-destination", str(into), "--loglevel=error"], cwd=into,
                              capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise OhifUnavailableError(f"`npm pack {spec}` took more than {NPM_TIMEOUT_S:.0f} s "
                                   "(is the npm registry reachable?)") from exc
    tarballs = sorted(into.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        raise OhifUnavailableError(f"`npm pack {spec}` failed with exit code {done.returncode} "
                                   f"(is the npm registry reachable?): {(done.stderr or done.stdout).strip()[-1500:]}")
    return tarballs[0]


def _unpack_dist(tarball: Path, into: Path) -> None:
    """Extract ``package/dist/`` as ``into/dist`` (tarfile's "data" filter: no links out, no devices)."""
    with tarfile.open(tarball, "r:gz") as archive:
        members = []
        for member in archive.getmembers():
            if member.name.startswith("package/dist/") and (member.isfile() or member.isdir()):
                member.name = member.name[len("package/"):]
                members.append(member)
        archive.extractall(into, members=members, filter="data")


def ohif_dist() -> Path:
    """The ``dist/`` directory of ``@ohif/app@OHIF_VERSION``: from the cache, else fetched with ``npm pack``.

    Safe when several test processes start at once (a lock file; the unpacked tree is renamed into
    place only when complete). Raises :class:`OhifUnavailableError` with the reason when it cannot.
    """
    root = cache_root()
    target = root / f"ohif-{OHIF_VERSION}"
    complete = target / ".complete"
    if complete.exists():
        return target / "dist"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"ohif-{OHIF_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete.exists():
            return target / "dist"
        work = Path(tempfile.mkdtemp(prefix="ohif-fetch-", dir=root))
        try:
            tarball = _npm_pack(work)
            integrity = _sri_sha512(tarball)
            if integrity != OHIF_INTEGRITY:
                raise OhifUnavailableError(f"{tarball.name} has integrity {integrity}, expected {OHIF_INTEGRITY}")
            unpacked = work / "unpacked"
            _unpack_dist(tarball, unpacked)
            if not (unpacked / "dist" / "index.html").is_file():
                raise OhifUnavailableError(f"{tarball.name} has no package/dist/index.html")
            (unpacked / ".complete").write_text(f"{OHIF_PACKAGE}@{OHIF_VERSION} {integrity}\n")
            if target.exists():  # a half-made tree of an interrupted older fetch
                shutil.rmtree(target)
            unpacked.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target / "dist"


def app_config_js(dicomweb_root: str = DICOMWEB_PREFIX) -> str:
    """OHIF's ``window.config``: one DICOMweb data source on this origin.

    The data source's options are those known to work against Orthanc's DICOMweb plugin (it supports
    ``includefield`` and serves bulk data by URI); the investigational-use dialog is turned off because
    it would cover the viewport on every load.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc DICOMweb (test)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "dicomweb",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _OhifHttpServer

    # ---------------------------------------------------------------- verbs

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(send_body=False)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(send_body=True)

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch(send_body=True)

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch(send_body=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # the requests are kept in server.requests instead of being printed

    # ---------------------------------------------------------------- routing

    def _dispatch(self, send_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
            self._proxy(send_body)
        elif self.command not in ("GET", "HEAD"):
            self._reply(405, b"only GET and HEAD outside /dicom-web\n", "text/plain", send_body)
        elif path == "/app-config.js":
            self._reply(200, self.server.app_config, CONTENT_TYPES[".js"], send_body)
        else:
            self._static(path, send_body)

    def _static(self, path: str, send_body: bool) -> None:
        dist = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        candidate = (dist / relative).resolve() if relative else dist / "index.html"
        if not candidate.is_relative_to(dist) or not candidate.is_file():
            candidate = dist / "index.html"  # a client-side route of the single-page viewer
        content_type = CONTENT_TYPES.get(candidate.suffix, "application/octet-stream")
        self._reply(200, candidate.read_bytes(), content_type, send_body)

    def _proxy(self, send_body: bool) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                              timeout=PROXY_TIMEOUT_S)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)  # Host kept as the browser sent it
            response = upstream.getresponse()
            payload = response.read()
            status = response.status
            reply_headers = [(k, v) for k, v in response.getheaders()
                             if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        except (OSError, http.client.HTTPException) as exc:
            status, payload, reply_headers = 502, f"Orthanc unreachable: {exc!r}\n".encode(), [
                ("Content-Type", "text/plain")]
        finally:
            upstream.close()
        self.server.record(self.command, self.path, status)
        self.send_response(status)
        for key, value in reply_headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if send_body:
            self.wfile.write(payload)

    def _reply(self, status: int, payload: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        # cross-origin isolation (SharedArrayBuffer for the codecs' workers); everything is same-origin
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if send_body:
            self.wfile.write(payload)


class _OhifHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dist: Path, upstream: str) -> None:
        super().__init__(address, _Handler)
        self.dist = dist.resolve()
        self.app_config = app_config_js().encode()
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname is None:
            raise ValueError(f"upstream must be an http:// URL of Orthanc, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=400)
        self._lock = threading.Lock()

    def record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


class OhifServer:
    """OHIF's ``dist/`` and Orthanc's DICOMweb on one origin (``url``), in a background thread."""

    def __init__(self, dist: Path, orthanc_url: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _OhifHttpServer((host, port), dist, orthanc_url)
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> OhifServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def dicomweb_requests(self) -> list[tuple[str, str, int]]:
        """The last proxied requests (method, path, status): what to print when a viewport stays empty."""
        with self._server._lock:
            return list(self._server.requests)


if __name__ == "__main__":  # scripts/setup.sh --test: `python -m tests.ohif_fixtures` pre-fetches the viewer
    print(f"{OHIF_PACKAGE}@{OHIF_VERSION}: {ohif_dist()}")
