"""STOW-RS: the results to a DICOMweb destination (PS3.18 10.5, Store Transaction), and its echo.

What goes over the wire: ``POST {url}/studies/{StudyInstanceUID}`` with ``Content-Type:
multipart/related; type="application/dicom"; boundary=...``, one part per Part 10 file, streamed
from the spool as it is (never decoded and encoded again; the SOP Instance UIDs stay). A job's
results all belong to the photo's study, so the request names it (PS3.18 10.5.1, the Study
resource, named after the first file): the server then refuses anything that is not of that
study rather than filing it elsewhere. SEG and SC go in one request, the SR, which references
them, in a second one once the first is answered, as with C-STORE.

The answer (PS3.18 10.5.3, Store Instances Response Module, Table 10.5.3-1): each instance is in
the Referenced SOP Sequence (0008,1199), stored (a Warning Reason (0008,1196) there still means
stored), or in the Failed SOP Sequence (0008,1198) with its Failure Reason (0008,1197), a C-STORE
failure code (PS3.4 B.2.3) reported in words. HTTP 200 and 202 answer per instance; so does 409
when some instances were stored (the partial failure of earlier editions of PS3.18, which
Orthanc 1.10 still answers). Any other 4xx means the request itself was refused (credentials,
URL, media type): sending it again cannot help, so :class:`StowError` says ``permanent`` and the
job fails at once with the server's reason. 408, 429, 5xx, refused connections and timeouts are
``permanent = False``: the dispatcher's persisted schedule tries again.

Why not ``dicomweb-client`` (highdicom's authors): its ``store_instances`` takes pydicom Datasets
and encodes each one again in memory, retries inside the call (hidden from the persisted
schedule), and raises ``requests.HTTPError`` on 409 before the per-instance answer is read; it
would also add ``requests`` and ``retrying`` to the node's dependencies. The protocol is one POST
and one JSON document, so it is written here with ``http.client`` (streaming, exact timeouts, our
TLS context).

Credentials come from environment variables named in the configuration, read at every request
(a rotated token is used without a restart) and never logged.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import Destination, is_loopback
from dicom_node.dispatch.scu import StoreOutcome
from dicom_node.net import status
from dicom_node.net.tls import TlsFilesError, client_context, describe_handshake_error

DICOM_JSON = "application/dicom+json"
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_CHARS = 300  # of a server's error text quoted in a job's reason

# DICOM JSON keys (PS3.18 F.2): the Store Instances Response Module, PS3.18 Table 10.5.3-1
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
REFERENCED_SOP_INSTANCE_UID = "00081155"

# HTTP answers that mean "not now" rather than "not this request" (RFC 9110 15.5.9, RFC 6585 4)
_TRANSIENT_4XX = (408, 429)


class StowError(RuntimeError):
    """A STOW-RS request (or the echo) got no per-instance answer.

    ``permanent``: the server refused the request itself (a 4xx): the configuration or the server
    must change before a retry can help. Otherwise the destination is unreachable or busy."""

    def __init__(self, message: str, *, permanent: bool, http_status: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.http_status = http_status


@dataclass(frozen=True)
class StowResponse:
    """One STOW-RS answer: the HTTP status and what it says about each instance."""

    http_status: int
    http_reason: str
    stored: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> 0x0000 or its Warning Reason
    failed: dict[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> Failure Reason
    message: str | None = None  # the server's own words, when it sent some

    def describe(self) -> str:
        """``HTTP 401 Unauthorized: <server's message>``."""
        text = f"HTTP {self.http_status} {self.http_reason}".rstrip()
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True)
class HttpAnswer:
    """What the echo got: the HTTP status, its reason phrase, and the server's message."""

    http_status: int
    http_reason: str
    message: str | None = None

    @property
    def reachable(self) -> bool:
        return self.http_status in (200, 204)  # QIDO-RS: matches, or none (PS3.18 10.6.3)

    def describe(self) -> str:
        text = f"HTTP {self.http_status} {self.http_reason}".rstrip()
        return f"{text}: {self.message}" if self.message else text


# --------------------------------------------------------------------------- the answer


def _first_value(item: Any, key: str) -> Any:
    element = item.get(key) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _items(document: dict[str, Any], key: str) -> list[Any]:
    element = document.get(key)
    values = element.get("Value") if isinstance(element, dict) else None
    return values if isinstance(values, list) else []


def _code(value: Any) -> int | None:
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def _server_message(document: Any, body: bytes, content_type: str) -> str | None:
    """A short line of the server's own explanation: a JSON error's message (Orthanc: ``Message``)
    or a plain-text body. HTML error pages are left out; so is anything long."""
    text: str | None = None
    if isinstance(document, dict):
        for key in ("Message", "message", "error", "Details", "detail"):
            if isinstance(document.get(key), str) and document[key].strip():
                text = document[key]
                break
    elif document is None and content_type.startswith("text/plain"):
        text = body.decode("utf-8", "replace")
    if not text:
        return None
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS] + "..."


def parse_response(http_status: int, http_reason: str, body: bytes, content_type: str = DICOM_JSON) -> StowResponse:
    """Read a STOW-RS answer (DICOM JSON, PS3.18 F.2) into per-instance results.

    Tolerant of servers that send JSON without a Content-Type (Orthanc on 4xx) or an empty
    sequence as ``{"vr": "SQ"}`` without a Value; a body that is not JSON gives no instances."""
    document: Any = None
    if body.strip():
        try:
            document = json.loads(body)
        except ValueError:
            document = None
    if isinstance(document, list) and len(document) == 1:
        document = document[0]  # some servers wrap the one response dataset in an array
    stored: dict[str, int] = {}
    failed: dict[str, int | None] = {}
    if isinstance(document, dict) and (REFERENCED_SOP_SEQUENCE in document or FAILED_SOP_SEQUENCE in document):
        for item in _items(document, REFERENCED_SOP_SEQUENCE):
            uid = _first_value(item, REFERENCED_SOP_INSTANCE_UID)
            if isinstance(uid, str):
                stored[uid] = _code(_first_value(item, WARNING_REASON)) or status.SUCCESS
        for item in _items(document, FAILED_SOP_SEQUENCE):
            uid = _first_value(item, REFERENCED_SOP_INSTANCE_UID)
            if isinstance(uid, str):
                failed[uid] = _code(_first_value(item, FAILURE_REASON))
        message = None
    else:
        message = _server_message(document, body, content_type)
    return StowResponse(http_status, http_reason, stored, failed, message)


# --------------------------------------------------------------------------- HTTP


def _secret(variable: str) -> str:
    value = os.environ.get(variable)
    if value is None or not value.strip():
        raise StowError(f"environment variable {variable} (the destination's credential) is not set",
                        permanent=True)
    return value.strip()


def auth_header(destination: Destination) -> str | None:
    """The ``Authorization`` header value (RFC 6750 bearer or RFC 7617 basic), read from the
    environment now; None without credentials. Raises :class:`StowError` (permanent) when the
    named variable is not set: the node cannot send there until someone sets it."""
    if destination.token_env is not None:
        return f"Bearer {_secret(destination.token_env)}"
    if destination.username is not None and destination.password_env is not None:
        pair = f"{destination.username}:{_secret(destination.password_env)}".encode()
        return f"Basic {base64.b64encode(pair).decode('ascii')}"
    return None


def ssl_context(destination: Destination) -> ssl.SSLContext:
    """The HTTPS context, built from the files now (renewed certificates need no restart).

    Verified by default: against ``ca_certificates`` when given (the same TLS 1.2+ BCP 195 profile
    as DICOM TLS, PS3.15 Annex B.9), else against the system's CAs; the host name or IP address of
    the URL must be in the certificate. ``verify_tls = false`` turns both checks off (warned about
    at start). Raises :class:`StowError` (not permanent) when a file cannot be used."""
    try:
        if destination.ca_certificates is not None:
            return client_context(destination.ca_certificates, destination.certificate, destination.private_key)
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not destination.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if destination.certificate is not None and destination.private_key is not None:
            context.load_cert_chain(destination.certificate, destination.private_key)
        return context
    except TlsFilesError as exc:
        raise StowError(f"{destination.url}: {exc}", permanent=False) from None
    except (ssl.SSLError, OSError) as exc:
        raise StowError(f"{destination.url}: cannot use the TLS files: {describe_handshake_error(exc)}",
                        permanent=False) from None


def _connection(destination: Destination, timeout_s: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the destination's server and the root's path (no trailing slash)."""
    assert destination.url is not None  # a dicomweb destination always has one (config validation)
    parts = urlsplit(destination.url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        return http.client.HTTPSConnection(host, parts.port, timeout=timeout_s,
                                           context=ssl_context(destination)), parts.path
    return http.client.HTTPConnection(host, parts.port, timeout=timeout_s), parts.path


def _exchange(destination: Destination, method: str, path: str, headers: dict[str, str], timeout_s: float,
              body: Iterator[bytes] | None = None) -> tuple[int, str, bytes, str]:
    """One request; (status, reason, body, content type). Raises :class:`StowError` (not
    permanent) when there is no HTTP answer: refused, unreachable, timed out, TLS failed."""
    where = destination.url
    headers = dict(headers)
    authorization = auth_header(destination)
    if authorization is not None:
        headers["Authorization"] = authorization
    connection, root = _connection(destination, timeout_s)
    try:
        connection.request(method, root + path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, response.reason or "", data, response.getheader("Content-Type") or ""
    except ssl.SSLError as exc:
        raise StowError(f"cannot connect to {where} over TLS: {describe_handshake_error(exc)}",
                        permanent=False) from None
    except TimeoutError:
        raise StowError(f"{where} did not answer within {timeout_s:g} s", permanent=False) from None
    except (OSError, http.client.HTTPException) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
        raise StowError(f"cannot connect to {where}: {why}", permanent=False) from None
    finally:
        connection.close()


# --------------------------------------------------------------------------- STOW-RS


@dataclass(frozen=True)
class _Instance:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    size: int


def _instance(path: Path) -> _Instance:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"])
        return _Instance(path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), path.stat().st_size)
    except (InvalidDicomError, AttributeError) as exc:
        raise ValueError(f"{path} is not a DICOM file with SOP and Study Instance UIDs: {exc}") from None


def _multipart(instances: Sequence[_Instance], boundary: str) -> tuple[Iterator[bytes], int]:
    """The multipart/related body (RFC 2387, PS3.18 8.6.1.2) as chunks read from disk, and its length
    (sent as Content-Length: some servers refuse chunked uploads)."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + i.size + 2 for i in instances) + len(tail)

    def chunks() -> Iterator[bytes]:
        for instance in instances:
            yield head
            with open(instance.path, "rb") as fh:
                while block := fh.read(CHUNK_BYTES):
                    yield block
            yield b"\r\n"
        yield tail

    return chunks(), length


def post_instances(destination: Destination, paths: Sequence[Path], timeout_s: float = 60.0) -> StowResponse:
    """One STOW-RS request with every file of ``paths``; the server's answer, whatever its status.

    Posted to ``{url}/studies/{study}``, the study of the first file: a job's results all belong to
    the photo's study, and one that does not is refused by the server (PS3.18 10.5.1) instead of
    being filed in another study. Raises :class:`StowError` (not permanent) when no HTTP answer comes."""
    instances = [_instance(Path(p)) for p in paths]
    if not instances:
        raise ValueError("nothing to store")
    path = f"/studies/{instances[0].study_instance_uid}"
    boundary = uuid.uuid4().hex
    body, length = _multipart(instances, boundary)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Content-Length": str(length), "Accept": DICOM_JSON}
    code, reason, data, content_type = _exchange(destination, "POST", path, headers, timeout_s, body)
    return parse_response(code, reason, data, content_type)


def _outcomes(instances: Sequence[_Instance], response: StowResponse) -> list[StoreOutcome]:
    """One outcome per instance from the answer; an instance the answer does not name is not stored."""
    outcomes = []
    for instance in instances:
        uid = instance.sop_instance_uid
        if uid in response.stored:
            outcomes.append(StoreOutcome(instance.path, uid, response.stored[uid]))
        elif uid in response.failed:
            code = response.failed[uid]
            words = status.describe(code) if code is not None else "no failure reason given"
            outcomes.append(StoreOutcome(instance.path, uid, code, f"HTTP {response.http_status} "
                                         f"{response.http_reason}: failure reason {words}"))
        else:
            outcomes.append(StoreOutcome(instance.path, uid, None,
                                         f"not in the server's answer ({response.describe()})"))
    return outcomes


def _refused(destination: Destination, response: StowResponse, outcomes: Sequence[StoreOutcome]) -> StowError:
    failures = "; ".join(f"{o.sop_instance_uid}: {status.describe(o.status)}" for o in outcomes
                         if not o.stored and o.status is not None)
    text = f"{destination.url} refused the request: {response.describe()}"
    if failures:
        text += f" (per instance: {failures})"
    transient = response.http_status >= 500 or response.http_status in _TRANSIENT_4XX
    return StowError(text, permanent=not transient, http_status=response.http_status)


def _answers_per_instance(response: StowResponse) -> bool:
    """200/202 (PS3.18 10.5.3), or a 409 under which some instances were stored (a partial failure)."""
    code = response.http_status
    return 200 <= code < 300 or (code == 409 and bool(response.stored))


def store_instances(destination: Destination, paths: Sequence[str | os.PathLike[str]], timeout_s: float = 60.0,
                    on_stored: Callable[[StoreOutcome], None] | None = None) -> list[StoreOutcome]:
    """STOW-RS every file to ``destination``: all but the last in one request, then the last.

    Returns one outcome per file, in order (a per-instance failure is an outcome); ``on_stored``
    is called for each stored instance as soon as its answer is read, so the caller records the
    delivery before anything else is sent. Raises :class:`StowError` when a request gets no
    per-instance answer: instances the failing answer still lists as stored are passed to
    ``on_stored`` first, and the last file is not sent when the first request failed."""
    files = [Path(p) for p in paths]
    if not files:
        return []
    groups = [files[:-1], files[-1:]] if len(files) > 1 else [files]
    outcomes: list[StoreOutcome] = []
    for group in groups:
        instances = [_instance(p) for p in group]
        response = post_instances(destination, group, timeout_s)
        answered = _outcomes(instances, response)
        if on_stored is not None:
            for outcome in answered:
                if outcome.stored:
                    on_stored(outcome)
        if not _answers_per_instance(response):
            raise _refused(destination, response, answered)
        outcomes.extend(answered)
    return outcomes


def echo(destination: Destination, timeout_s: float = 30.0) -> HttpAnswer:
    """QIDO-RS ``GET {url}/studies?limit=1`` (PS3.18 10.6): 200 or 204 means the root answers and
    accepts the node's credentials. Raises :class:`StowError` when there is no HTTP answer."""
    code, reason, data, content_type = _exchange(destination, "GET", "/studies?limit=1", {"Accept": DICOM_JSON},
                                                 timeout_s)
    document: Any = None
    try:
        document = json.loads(data) if data.strip() else None
    except ValueError:
        document = None
    message = None if code in (200, 204) else _server_message(document, data, content_type)
    return HttpAnswer(code, reason, message)


def start_warnings(destination: Destination) -> list[str]:
    """What an operator should know about a DICOMweb destination when the node starts."""
    warnings = []
    if destination.is_https and not destination.verify_tls:
        warnings.append("verify_tls = false: the server's certificate is not checked, anyone on the path can "
                        "read and alter the results")
    host = urlsplit(destination.url or "").hostname or ""
    if not destination.is_https and (destination.token_env or destination.username) and not is_loopback(host):
        warnings.append("credentials are sent over plain http to another machine: use an https:// url")
    for variable in (destination.token_env, destination.password_env):
        if variable is not None and not os.environ.get(variable, "").strip():
            warnings.append(f"environment variable {variable} is not set: sends there will fail until it is")
    return warnings
