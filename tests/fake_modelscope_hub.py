"""A local stand-in for the ModelScope hub, for testing ``dicom-node model fetch`` with the real client.

modelscope.cn cannot be reached from the test machines, and the official weights may not be
redistributed (CC BY-NC 4.0), so the tests run the real ``modelscope`` client (1.40.2, which
delegates to ``modelscope_hub`` 0.5.1) against this server, serving an untrained model made
locally. It answers the requests that client's ``snapshot_download`` makes, found by reading
``modelscope_hub/_legacy_api.py`` and ``_download.py`` and by logging what it asked for:

- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=R&Recursive=True``: the file listing
  (``{"Data": {"Files": [{"Path", "Name", "Type", "Size", "Sha256", ...}]}}``); the client checks
  every download against the listed size and sha256.
- ``GET|HEAD /api/v1/models/{owner}/{name}/repo?Revision=R&FilePath=F``: the file itself, with
  ``Range`` (the client resumes an interrupted download from its ``.incomplete`` file, and its
  optional parallel mode fetches ranges).
- ``GET /api/v1/repos/internalAccelerationInfo``: an Alibaba-cloud region probe; 404 here, as on
  any machine outside that cloud.
- ``GET /api/v1/models/{owner}/{name}``: repository info (used when the client probes which hub
  holds a repository; not needed when the endpoint is given, kept for completeness).

Anything else is answered 404 and recorded, so a test sees a request the hub did not expect.
Every request is recorded (method, path, query, Range) for tests to assert on, e.g. which
revision the client asked for.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

# A business code the client maps to NotExistError (what the real hub answers for an unknown repo or revision).
NOT_EXIST_CODE = 10010205001
SEND_PIECE_BYTES = 64 * 1024  # written and flushed piecewise, so the client sees progress as on a real network


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    range: str | None


@dataclass
class HubRepo:
    """One repository at one revision: file name -> bytes."""

    model_id: str
    revision: str
    files: dict[str, bytes]
    # Close the connection after this many bytes of a file's first full GET (tests the client's resume).
    drop_first_get_after: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_id: str, revision: str, directory: Path, names: list[str] | None = None) -> HubRepo:
        names = names or sorted(p.name for p in directory.iterdir() if p.is_file())
        return cls(model_id, revision, {name: (directory / name).read_bytes() for name in names})


class FakeModelScopeHub:
    """A threaded HTTP server on 127.0.0.1 serving :class:`HubRepo` s; use as a context manager."""

    def __init__(self, *repos: HubRepo, piece_delay_s: float = 0.0) -> None:
        self.repos = {(r.model_id, r.revision): r for r in repos}
        self.piece_delay_s = piece_delay_s  # pacing between pieces, for a progress bar that has time to move
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._dropped: set[tuple[str, str, str]] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-modelscope-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeModelScopeHub:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    def recorded(self, method: str | None = None, path_suffix: str = "") -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and r.path.endswith(path_suffix)]

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _should_drop(self, repo: HubRepo, name: str) -> int | None:
        limit = repo.drop_first_get_after.get(name)
        key = (repo.model_id, repo.revision, name)
        with self._lock:
            if limit is None or key in self._dropped:
                return None
            self._dropped.add(key)
            return limit

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
                pass  # recorded in hub.requests instead of cluttering the test output

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                hub._record(RecordedRequest(self.command, url.path, query, self.headers.get("Range")))
                match = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/repo/files|/repo)?", url.path)
                if match is None:
                    self._json(404, {"Code": 404, "Message": f"fake hub: no route for {url.path}", "Success": False})
                    return
                model_id, what = match.group(1), match.group(2)
                if not what:
                    if not any(mid == model_id for mid, _ in hub.repos):
                        self._not_exist(f"model {model_id} not found")
                        return
                    self._json(200, {"Code": 200, "Data": {"Name": model_id.split("/")[1], "Path": model_id},
                                     "Success": True})
                    return
                revision = query.get("Revision", "master")
                repo = hub.repos.get((model_id, revision))
                if repo is None:
                    self._not_exist(f"revision {revision} of {model_id} not found")
                    return
                if what == "/repo/files":
                    files = [{"Name": name, "Path": name, "Type": "blob", "Size": len(data),
                              "Sha256": hashlib.sha256(data).hexdigest(), "Revision": revision}
                             for name, data in sorted(repo.files.items())]
                    self._json(200, {"Code": 200, "Data": {"Files": files}, "Success": True})
                    return
                name = query.get("FilePath", "")
                if name not in repo.files:
                    self._not_exist(f"file {name} not found")
                    return
                self._file(repo, name, head)

            def _file(self, repo: HubRepo, name: str, head: bool) -> None:
                data = repo.files[name]
                start, end, status = 0, len(data) - 1, 200
                requested = self.headers.get("Range")
                if requested:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", requested.strip())
                    if m is None or int(m.group(1)) >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start = int(m.group(1))
                    end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
                    status = 206
                body = data[start:end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if head:
                    return
                drop_after = hub._should_drop(repo, name) if status == 200 else None
                limit = len(body) if drop_after is None else min(drop_after, len(body))
                sent = 0
                while sent < limit:
                    piece = body[sent:min(sent + SEND_PIECE_BYTES, limit)]
                    self.wfile.write(piece)
                    self.wfile.flush()
                    sent += len(piece)
                    if hub.piece_delay_s:
                        time.sleep(hub.piece_delay_s)
                if drop_after is not None:
                    self.close_connection = True  # a short body: the client must notice and resume

            def _not_exist(self, message: str) -> None:
                self._json(404, {"Code": NOT_EXIST_CODE, "Message": message, "Success": False})

            def _json(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
