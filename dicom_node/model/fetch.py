"""Downloading the official M2FP weights from ModelScope (the optional ``fetch`` extra).

The node runs ``dicom-node model fetch --dir MODEL_DIR`` as a child process while it already
receives photos, and its workers load the model the moment ``configuration.json`` and
``pytorch_model.pt`` are both in ``MODEL_DIR``. Hence the order of things here:

1. Fail in seconds when the hub cannot be reached (:func:`hub_unreachable_reason`), instead of
   letting the client import itself and retry for half a minute.
2. Download into a hidden staging directory inside ``MODEL_DIR`` (same filesystem, so the final
   moves are atomic renames), with progress: a bar on a terminal, a log line per 10 % otherwise.
3. Load the download with the strict loader there. A download that does not load is deleted
   and ``MODEL_DIR`` is never touched.
4. Move the weights in first, then the record (:data:`MODEL_RECORD_FILE`: where they came from,
   their sha256 and state-dict digest), and ``configuration.json`` last: the configuration is
   the commit point, so a watcher never sees a configuration without complete weights.

An interrupted or failed *transfer* (network error, the node stopping its child) keeps the
staging directory: the client resumes its ``.incomplete`` files with HTTP ranges on the next run,
which matters for a 720 MB file. Only a download that was complete and *wrong* is removed.

modelscope is imported inside :func:`fetch_model` only, and torch too: the node imports this
module for :func:`hub_unreachable_reason` without paying for either, and modelscope never runs at
inference time (its own M2FP code pulls in torchvision, timm and mmcv, none of which we need).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol
from urllib.parse import urlsplit

from dicom_node.logs import fields
from dicom_node.model.names import CONFIG_FILE, MODEL_RECORD_FILE, UNTRAINED_MARKER, WEIGHTS_FILE, model_present

log = logging.getLogger(__name__)

MODEL_ID = "damo/cv_resnet101_image-multiple-human-parsing"
# The hub tag this release downloads unless told otherwise (`model fetch --revision`). v1.0.1 is the
# tag other public projects pin for this model. It could NOT be downloaded from the machine this was
# written on (the hub is unreachable there): the code was verified against a local hub that serves
# an untrained model in the same layout, not against the real v1.0.1. The first real fetch records
# its sha256 in MODEL_RECORD_FILE; pin that digest here once it has been seen.
MODEL_REVISION = "v1.0.1"

# The hub, as modelscope_hub reads it: MODELSCOPE_ENDPOINT (a URL; http:// works, for a mirror or a
# test hub), else the deprecated MODELSCOPE_DOMAIN (a host, https assumed), else modelscope.cn. We
# resolve it ourselves and hand it to the client, so the record names the hub that was really used
# and the client does not probe modelscope.ai when modelscope.cn lacks the repository.
HUB_ENDPOINT_ENV = "MODELSCOPE_ENDPOINT"
HUB_DOMAIN_ENV = "MODELSCOPE_DOMAIN"
DEFAULT_HUB_ENDPOINT = "https://modelscope.cn"
PROBE_TIMEOUT_S = 5.0  # DNS and TCP each; a reachable hub answers in well under a second

FETCHED_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # the hub repository also holds a README and images
PROGRESS_STEP_PERCENT = 10
RECORD_FORMAT = 1

LICENCE_NOTE = (
    "The M2FP weights are licensed CC BY-NC 4.0 (non-commercial use only) by their authors; "
    "dicom_node does not bundle them."
)


class FetchError(RuntimeError):
    """The weights could not be downloaded or are not a usable M2FP model directory."""


@dataclass(frozen=True)
class ModelRecord:
    """What :data:`MODEL_RECORD_FILE` holds: enough to say later which weights a node ran."""

    format: int
    hub: str
    model_id: str
    revision: str
    sha256: str  # of pytorch_model.pt as downloaded (file bytes)
    state_dict_digest: str  # the loader's digest: the model version the node reports
    size_bytes: int
    config_sha256: str
    untrained: bool  # true only for a test hub serving `make-test` weights: never a real model
    fetched_at: str  # UTC, ISO 8601


# --------------------------------------------------------------------------------------------
# Where the hub is, and whether it can be reached
# --------------------------------------------------------------------------------------------
def hub_endpoint() -> str:
    """The hub URL, with the precedence modelscope_hub itself uses (see :data:`HUB_ENDPOINT_ENV`)."""
    value = os.environ.get(HUB_ENDPOINT_ENV, "").strip() or os.environ.get(HUB_DOMAIN_ENV, "").strip()
    if not value:
        return DEFAULT_HUB_ENDPOINT
    if not value.lower().startswith(("http://", "https://")):
        value = "https://" + value
    return value.rstrip("/")


def _resolves(host: str, port: int, timeout_s: float) -> list[tuple[Any, ...]] | None:
    """getaddrinfo with a deadline: a resolver without network can hang far longer than we want to wait."""
    outcome: list[list[tuple[Any, ...]] | None] = []

    def lookup() -> None:
        try:
            outcome.append(list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except OSError:
            outcome.append(None)

    thread = threading.Thread(target=lookup, name="hub-dns-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else None


def hub_unreachable_reason(endpoint: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached from here (a short phrase), or None if it looks reachable.

    Resolves the host and opens one TCP connection, each within ``timeout_s``: seconds, where the
    download client would spend half a minute importing itself and retrying. Behind a proxy
    (HTTPS_PROXY etc.) the hub is reached through the proxy, so no direct probe is made.
    """
    endpoint = endpoint or hub_endpoint()
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"{endpoint} is not a URL"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return None
    addresses = _resolves(host, port, timeout_s)
    if not addresses:
        return f"this machine is offline: cannot resolve {host}"
    last_error = "no address"
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout_s)
                sock.connect(address)
            return None
        except OSError as exc:
            last_error = exc.strerror or type(exc).__name__
    return f"cannot connect to {host} port {port} ({last_error})"


def offline_help(model_id: str, target_dir: Path) -> str:
    """What to do instead, in words an administrator can paste."""
    return (
        f"Offline, fetch it on another machine with `dicom-node model fetch --dir DIR` (or "
        f"`modelscope download --model {model_id} --revision {MODEL_REVISION} --local_dir DIR`) and copy DIR "
        f"to {target_dir}. For tests only: `dicom-node model make-test --dir DIR` writes an UNTRAINED model."
    )


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
class ProgressCallback(Protocol):
    """modelscope's per-file progress interface: ``cls(filename, file_size)``, then ``update``/``end``."""

    def __init__(self, filename: str, file_size: int) -> None: ...

    def update(self, size: int) -> None: ...

    def end(self) -> None: ...


class LoggedProgress:
    """One log line each time a file passes another 10 %, for logs (journald, the node's log file).

    modelscope calls ``update`` from its download threads (several per file in its parallel mode),
    hence the lock. A negative ``update`` means the client restarted the file from scratch.
    """

    def __init__(self, filename: str, file_size: int) -> None:
        self.filename = filename
        self.file_size = file_size
        self._lock = threading.Lock()
        self._bytes = 0
        self._logged_percent = 0
        self._rate_origin: tuple[float, int] | None = None  # (time, bytes) at the first update

    def update(self, size: int) -> None:
        with self._lock:
            self._bytes = max(0, self._bytes + size)
            now = time.monotonic()
            if self._rate_origin is None:
                # The first update may be a resumed file's existing prefix: no measure of the network.
                self._rate_origin = (now, self._bytes)
                eta_s: float | None = None
            else:
                t0, b0 = self._rate_origin
                rate = (self._bytes - b0) / (now - t0) if now > t0 else 0.0
                eta_s = (self.file_size - self._bytes) / rate if rate > 0 else None
            if self.file_size <= 0:
                return
            step = min(100, self._bytes * 100 // self.file_size) // PROGRESS_STEP_PERCENT * PROGRESS_STEP_PERCENT
            if step <= self._logged_percent:
                return
            self._logged_percent = step
            if step == 100:
                eta_s = 0.0
            log.info(fields(event="model.download", file=self.filename, percent=step, bytes=self._bytes,
                            of=self.file_size, eta_s=None if eta_s is None else f"{max(0.0, eta_s):.0f}"))

    def end(self) -> None:
        pass


FALLBACK_BAR_COLUMNS, FALLBACK_BAR_ROWS = 100, 24
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}, ETA {remaining}, {rate_fmt}]"


class BarProgress:
    """A tqdm bar per file, in bytes with ETA, for a person at a terminal."""

    def __init__(self, filename: str, file_size: int, stream: IO[str] | None = None) -> None:
        from tqdm import tqdm  # noqa: PLC0415 (only a terminal needs it)

        stream = stream or sys.stderr
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        # A terminal that reports no size (a fresh pty, some `docker run -t`) makes tqdm print
        # empty lines (0 columns, -1 rows): give it a size instead.
        size: dict[str, Any] = ({"dynamic_ncols": True} if columns > 0
                                else {"ncols": FALLBACK_BAR_COLUMNS, "nrows": FALLBACK_BAR_ROWS})
        self._lock = threading.Lock()
        self._bar = tqdm(total=file_size if file_size > 0 else None, desc=filename, unit="B", unit_scale=True,
                         unit_divisor=1024, bar_format=BAR_FORMAT, file=stream, leave=True, disable=False, **size)

    def update(self, size: int) -> None:
        with self._lock:
            self._bar.update(size)

    def end(self) -> None:
        with self._lock:
            self._bar.close()


def progress_class(mode: Literal["bar", "log"] | None = None) -> type[ProgressCallback]:
    """The bar when stderr is a terminal, log lines otherwise (``mode`` forces one)."""
    if mode is None:
        mode = "bar" if sys.stderr.isatty() else "log"
    return BarProgress if mode == "bar" else LoggedProgress


def _route_client_logs() -> None:
    """Before modelscope is imported: give its logger a NullHandler, so that it does not install its
    own stream handler (another line format) and its warnings (retries) reach ours instead."""
    hub_logger = logging.getLogger("modelscope_hub")
    if not hub_logger.handlers:
        hub_logger.addHandler(logging.NullHandler())


@contextlib.contextmanager
def _client_bars_quiet() -> Iterator[None]:
    """Keep modelscope_hub's own progress bars out of our output, for the call.

    Its download code draws a tqdm bar per file and one per snapshot whatever callbacks it is
    given: beside ours on a terminal they double up, and in a log file they are carriage-return
    garbage. There is no switch for them (tqdm's TQDM_DISABLE is read when tqdm is imported), so
    the module's ``tqdm`` name is swapped for a disabled one while we download, and put back.
    """
    try:
        import modelscope_hub._download as client_download  # noqa: PLC0415
    except ImportError:  # a different client layout: its bars show, nothing breaks
        yield
        return
    original = getattr(client_download, "tqdm", None)
    if original is None:
        yield
        return
    client_download.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        client_download.tqdm = original


# --------------------------------------------------------------------------------------------
# The fetch
# --------------------------------------------------------------------------------------------
def staging_dir_for(target_dir: Path, revision: str) -> Path:
    """A hidden directory inside ``target_dir`` (same filesystem: the moves into place are renames;
    and the one directory a hardened service may write, ``ReadWritePaths`` of the systemd unit, not
    its parent), one per revision (a resumed partial file always belongs to the revision asked
    for). Watchers look at two file names only, so a staging directory there is never mistaken for
    a model."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", revision)
    return target_dir / f".fetch-{safe}"


def read_model_record(model_dir: Path) -> dict[str, Any] | None:
    """The record ``model fetch`` left in ``model_dir``, or None (copied by hand, or make-test)."""
    try:
        data = json.loads((model_dir / MODEL_RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(staging: Path) -> Iterator[None]:
    """One fetch per staging directory (the node's child and an administrator's may race).

    flock, not a pid file: the kernel drops it when the process dies, however it dies."""
    staging.mkdir(parents=True, exist_ok=True)
    with (staging / "fetch.lock").open("a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise FetchError(f"another `dicom-node model fetch` is already downloading into {staging}") from exc
        yield


def _holds_partial_download(staging: Path) -> bool:
    download = staging / "model"
    return download.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in download.rglob("*"))


def _discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _place(download: Path, target_dir: Path, record: ModelRecord) -> None:
    """Weights, then record, then configuration (the commit point) into ``target_dir``, by rename."""
    target_dir.mkdir(parents=True, exist_ok=True)
    # A stale configuration would pair with the new weights before ours lands; a stale UNTRAINED
    # marker would brand real weights as random.
    for stale in (CONFIG_FILE, UNTRAINED_MARKER, MODEL_RECORD_FILE):
        (target_dir / stale).unlink(missing_ok=True)
    for name in FETCHED_FILES:
        _fsync_file(download / name)
    record_tmp = download / MODEL_RECORD_FILE
    record_tmp.write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    _fsync_file(record_tmp)
    os.replace(download / WEIGHTS_FILE, target_dir / WEIGHTS_FILE)
    os.replace(record_tmp, target_dir / MODEL_RECORD_FILE)
    os.replace(download / CONFIG_FILE, target_dir / CONFIG_FILE)
    _fsync_dir(target_dir)


def fetch_model(
    target_dir: str | Path,
    model_id: str = MODEL_ID,
    revision: str | None = None,
    endpoint: str | None = None,
    force: bool = False,
    progress: Literal["bar", "log"] | None = None,
) -> ModelRecord:
    """Download, verify strictly and install the model in ``target_dir``; return what was installed.

    ``revision`` None means :data:`MODEL_REVISION`. Refuses a ``target_dir`` that already holds a
    model unless ``force`` (replacing weights under a running node should be a decision).
    Raises :class:`FetchError` with a message for the administrator; ``target_dir`` is then as it was.
    """
    target_dir = Path(target_dir).absolute()
    revision = revision or MODEL_REVISION
    endpoint = endpoint or hub_endpoint()
    if model_present(target_dir) and not force:
        raise FetchError(f"{target_dir} already holds a model ({CONFIG_FILE} and {WEIGHTS_FILE}); "
                         "remove them to fetch again")
    reason = hub_unreachable_reason(endpoint)
    if reason is not None:
        raise FetchError(f"cannot download {model_id} from the ModelScope hub at {endpoint} ({reason}). "
                         + offline_help(model_id, target_dir))
    _route_client_logs()
    try:
        from modelscope.hub.snapshot_download import snapshot_download  # noqa: PLC0415 (optional extra)
    except ImportError as exc:
        raise FetchError(
            "modelscope is not installed: run `.venv/bin/pip install '.[fetch]'` (it is only needed to download "
            f"the weights). {offline_help(model_id, target_dir)}"
        ) from exc

    staging = staging_dir_for(target_dir, revision)
    with _exclusive(staging):
        if model_present(target_dir) and not force:  # another fetch finished while we waited
            raise FetchError(f"{target_dir} already holds a model (another fetch installed it just now)")
        download = staging / "model"
        resumed = _holds_partial_download(staging)
        log.info(fields(event="model.fetch", model_id=model_id, revision=revision, hub=endpoint,
                        staging=staging, resumed=resumed or None))
        try:
            with _client_bars_quiet():
                snapshot_download(model_id, revision=revision, cache_dir=str(staging / "cache"),
                                  local_dir=str(download), endpoint=endpoint, allow_patterns=list(FETCHED_FILES),
                                  progress_callbacks=[progress_class(progress)])
        except Exception as exc:  # modelscope raises requests/HTTP/its own errors; all mean "transfer failed"
            kept = _holds_partial_download(staging)
            if not kept:
                _discard(staging)
            raise FetchError(
                f"cannot download {model_id} revision {revision} from the ModelScope hub at {endpoint} "
                f"({type(exc).__name__}: {exc}). "
                + (f"The partial download is kept in {staging}; run the fetch again to resume it. " if kept else "")
                + offline_help(model_id, target_dir)
            ) from exc
        try:
            record = _verify(download, endpoint, model_id, revision)
        except FetchError:
            _discard(staging)
            raise
        _place(download, target_dir, record)
    _discard(staging)
    log.info(fields(event="model.fetched", model_dir=target_dir, model_id=model_id, revision=revision,
                    sha256=record.sha256, digest=record.state_dict_digest[:16],
                    untrained=record.untrained or None))
    return record


def _verify(download: Path, endpoint: str, model_id: str, revision: str) -> ModelRecord:
    """Load the download strictly where it lies; a model that does not load is never installed."""
    from dicom_node.model.checkpoint import ModelLoadError, load_model_dir  # noqa: PLC0415 (torch: seconds)

    for name in FETCHED_FILES:
        if not (download / name).is_file():
            present = sorted(p.name for p in download.iterdir()) if download.is_dir() else []
            raise FetchError(f"the download of {model_id} revision {revision} lacks {name} (it holds: {present}); "
                             "nothing was installed")
    try:
        loaded = load_model_dir(download)
    except ModelLoadError as exc:
        raise FetchError(f"downloaded {model_id} revision {revision} from {endpoint}, but it is not a usable "
                         f"M2FP model: {exc}. Nothing was installed and the download was deleted") from exc
    digest, untrained = loaded.digest, loaded.untrained
    del loaded  # 63 M parameters: not kept while we hash and move files
    weights = download / WEIGHTS_FILE
    return ModelRecord(
        format=RECORD_FORMAT, hub=endpoint, model_id=model_id, revision=revision, sha256=_sha256_file(weights),
        state_dict_digest=digest, size_bytes=weights.stat().st_size,
        config_sha256=_sha256_file(download / CONFIG_FILE), untrained=untrained,
        fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
