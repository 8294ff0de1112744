"""The checks of ``dicom-node check``, one function per thing an installation needs.

Each check asks the code the node itself runs: the strict model loader, the runtime choice's cache
keys, intake's disk watermark, the TLS context builders, the dispatcher's C-ECHO and QIDO-RS echo.
So "ok" here means the node would accept it, and "fail" names what the node would stumble on,
in the node's own words. Checks run side by side, network checks with short timeouts, and the
whole run has a deadline: the command answers even when a peer does not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from dicom_node.checkup.orthanc_rule import ORTHANC_CONFIG, OrthancRuleError, orthanc_dir_for, read_rule
from dicom_node.checkup.ports import port_state
from dicom_node.checkup.result import CheckRow, Status, fail, ok, skip, warn
from dicom_node.config import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Destination,
    NodeConfig,
    is_loopback,
    load_config,
)
from dicom_node.dispatch import stow
from dicom_node.dispatch.dispatcher import dimse_peer
from dicom_node.dispatch.scu import AssociationError, echo
from dicom_node.intake.watermark import MB, DiskWatermark
from dicom_node.model.names import CONFIG_FILE, MODEL_RECORD_FILE, UNTRAINED_MARKER, WEIGHTS_FILE, model_present
from dicom_node.net import status as dicom_status
from dicom_node.net.tls import TlsFilesError, client_context, server_context

if TYPE_CHECKING:
    from dicom_node.model.checkpoint import LoadedModel

NETWORK_TIMEOUT_S = 5.0  # per destination: connect, associate, answer
DEADLINE_S = 180.0  # the whole run; the full model's strict load and digest take seconds, not minutes
EXPIRY_WARNING_DAYS = 30

Task = Callable[[], list[CheckRow]]


# --------------------------------------------------------------------------- configuration


def chosen_config_path(path: Path | None) -> Path:
    """The file :func:`load_config` reads for ``path`` (``--config``), the Orthanc rule sits beside it."""
    return Path(path if path is not None else os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH))


def _config_row(config: NodeConfig, path: Path) -> CheckRow:
    where = str(path) if path.is_file() else f"no file at {path}: defaults and DICOM_NODE_* variables"
    return ok("configuration", f"{where}: valid; AE {config.ae_title} on {config.bind_address}:{config.port}, "
                               f"{len(config.callers)} caller(s), {len(config.destinations)} destination(s)")


# --------------------------------------------------------------------------- model and runtime


def _model_fix(model_dir: Path) -> str:
    return (f"install the weights: `dicom-node model fetch --dir {model_dir}` (needs `pip install '.[fetch]'` "
            "and the ModelScope hub; offline, fetch elsewhere and copy the directory), or point model_dir "
            f"(DICOM_NODE_MODEL_DIR) at one; for tests only: `dicom-node model make-test --dir {model_dir}`")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_mismatch(model_dir: Path, digest: str) -> str | None:
    """What differs from the record ``model fetch`` wrote (None: no record, or it matches)."""
    path = model_dir / MODEL_RECORD_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"the fetch record {path} cannot be read ({exc})"
    if not isinstance(record, dict):
        return f"the fetch record {path} is not a JSON object"
    recorded = record.get("state_dict_digest")
    if isinstance(recorded, str) and recorded != digest:
        return (f"the weights' digest {digest[:16]} is not the one `model fetch` recorded "
                f"({recorded[:16]}, {MODEL_RECORD_FILE})")
    for key, name in (("sha256", WEIGHTS_FILE), ("config_sha256", CONFIG_FILE)):
        sha = record.get(key)
        if isinstance(sha, str) and sha != _sha256(model_dir / name):
            return f"{name} is not the file `model fetch` recorded (its sha256 differs from {MODEL_RECORD_FILE})"
    return None


def _model_row(loaded: LoadedModel) -> CheckRow:
    """Untrained is a warning unless it is the marked test model that ``model make-test`` writes:
    that one is deliberate (a test or demo install) and its UNTRAINED flag travels in every result;
    random weights without the marker are someone's mistake."""
    model_dir = loaded.model_dir
    mismatch = _record_mismatch(model_dir, loaded.digest)
    if mismatch is not None:
        return fail("model", mismatch, f"fetch the weights again: `dicom-node model fetch --dir {model_dir}`")
    recorded = " (as `model fetch` recorded it)" if (model_dir / MODEL_RECORD_FILE).exists() else ""
    detail = f"{model_dir}: loads strictly, version {loaded.digest[:16]}{recorded}"
    if not loaded.untrained:
        return ok("model", f"{detail}, trained")
    if (model_dir / UNTRAINED_MARKER).is_file():
        return ok("model", f"{detail}; UNTRAINED test model from `model make-test`: its results mean nothing")
    return warn("model", f"{detail}; UNTRAINED (random weights, marked only in {CONFIG_FILE}): its results mean "
                         "nothing", _model_fix(model_dir))


def _runtime_row(config: NodeConfig, loaded: LoadedModel) -> CheckRow:
    """What the workers' ``choose_runtime`` will find: the same cache file and keys (threads as the
    workers set them), so "cached" means the first start loads a result and measures nothing."""
    from dicom_node.model.runtime.agreement import Agreement
    from dicom_node.model.runtime.cache import CACHE_DIR_NAME, read_json
    from dicom_node.model.runtime.choice import best_candidate, check_key, cpu_refusal
    from dicom_node.model.runtime.names import CANDIDATES, RuntimeName
    from dicom_node.pipeline.worker import torch_threads

    requested = config.worker.runtime
    if config.worker.count == 0:
        return ok("runtime", "no workers (worker.count = 0): nothing is parsed, nothing to choose")
    if requested == RuntimeName.EAGER:
        return ok("runtime", "eager (the fp32 reference): nothing to measure")
    threads = torch_threads(config.worker)
    names = [str(n) for n in CANDIDATES] if requested == RuntimeName.AUTO else [str(requested)]
    names = [name for name in names if cpu_refusal(name) is None]  # never measured on this CPU
    keys = {name: check_key(name, threads) for name in names}
    stem = f"agreement-{loaded.digest[:16]}.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    places = [loaded.model_dir / CACHE_DIR_NAME / stem,  # where cache_dir_for puts it, or its fallback
              base / "dicom_node" / CACHE_DIR_NAME / loaded.digest[:16] / stem]
    results = next((read_json(p) for p in places if p.is_file()), {})
    checked: dict[str, Agreement | str] = {}
    for name in names:
        try:
            checked[name] = Agreement(**results[keys[name]])
        except (KeyError, TypeError):
            pass
    missing = [name for name in names if name not in checked]
    if missing:
        return warn("runtime", f"{requested}: not measured yet for this model, machine, {threads} thread(s) and "
                               f"these package versions ({', '.join(missing)}): the first start checks them against "
                               "eager before parsing (a few minutes for the full model)",
                    "start the node once and let the check finish (its result is kept in "
                    f"{loaded.model_dir / CACHE_DIR_NAME}), or set [worker] runtime = \"eager\"; a candidate that "
                    "cannot run here (e.g. openvino not installed) is measured again at every start")
    best = best_candidate(checked, str(requested), config.worker.runtime_max_rss_mib)
    if best is None:
        return ok("runtime", f"{requested}: cached: eager (no candidate passed and was faster)")
    return ok("runtime", f"{requested}: cached: {best.runtime} ({best.summary()})")


def model_rows(config: NodeConfig) -> list[CheckRow]:
    model_dir = config.model_dir
    if not model_present(model_dir):
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (model_dir / name).is_file()]
        fetching = " (auto_fetch_model: serve tries `model fetch` itself)" if config.auto_fetch_model else ""
        return [fail("model", f"no M2FP model in {model_dir}: {', '.join(missing)} missing{fetching}",
                     _model_fix(model_dir)),
                skip("runtime", "not checked: no model")]
    from dicom_node.model.checkpoint import ModelLoadError, load_model_dir

    try:
        loaded = load_model_dir(model_dir)
    except ModelLoadError as exc:
        return [fail("model", f"{model_dir} does not load strictly: {exc}", _model_fix(model_dir)),
                skip("runtime", "not checked: the model does not load")]
    except (OSError, MemoryError, RuntimeError) as exc:
        return [fail("model", f"{model_dir} cannot be loaded: {type(exc).__name__}: {exc}", _model_fix(model_dir)),
                skip("runtime", "not checked: the model does not load")]
    return [_model_row(loaded), _runtime_row(config, loaded)]


# --------------------------------------------------------------------------- data directory


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _directory_row(name: str, directory: Path, key: str) -> CheckRow:
    """Writable, or creatable by serve: tried with a real file, as a permission bit can lie (ACLs,
    read-only mounts)."""
    where = _existing_ancestor(directory)
    if directory.exists() and not directory.is_dir():
        return fail(name, f"{directory} exists and is not a directory", f"remove it or point {key} elsewhere")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".dicom-node-check-"):
            pass
    except OSError as exc:
        return fail(name, f"{where} is not writable: {exc.strerror or exc}",
                    f"give the node's user write access to {where}, or point {key} elsewhere")
    state = "writable" if where == directory.absolute() else f"does not exist yet; serve creates it in {where}"
    return ok(name, f"{directory}: {state}")


def _disk_row(name: str, directory: Path, config: NodeConfig, consequence: str, near: str,
              ok_note: str) -> CheckRow:
    """Free space against intake's own watermark (the same object intake asks), so "full" here
    means what the node would stumble on."""
    where = _existing_ancestor(directory)
    watermark = DiskWatermark.from_settings(where, config.intake)
    try:
        free = watermark.free_bytes()
    except OSError as exc:
        return fail(name, f"free space of {where} unknown: {exc.strerror or exc}",
                    "intake refuses photos when it cannot tell: check the file system")
    low, resume = watermark.min_free_bytes / MB, watermark.resume_free_bytes / MB
    detail = f"{free / MB:.0f} MB free in {directory}"
    room = (f"free space in {directory} (`dicom-node jobs purge --older-than 7d`, or lower retention.done_after_h) "
            f"or grow the file system")
    if free < watermark.min_free_bytes:
        return fail(name, f"{detail}, below the watermark of {low:.0f} MB (intake.min_free_disk_mb): {consequence}",
                    f"{room}; intake takes photos again at {resume:.0f} MB free")
    if free < watermark.resume_free_bytes:
        return warn(name, f"{detail}, less than {resume:.0f} MB: within intake.resume_free_disk_mb of the "
                          f"watermark ({low:.0f} MB), where {near}", room)
    return ok(name, f"{detail} ({ok_note} {low:.0f} MB)")


def _same_file_system(a: Path, b: Path) -> bool:
    return os.stat(_existing_ancestor(a)).st_dev == os.stat(_existing_ancestor(b)).st_dev


def storage_rows(config: NodeConfig) -> list[CheckRow]:
    """The data directory (job store, health file) and the spool (photos, results) writable, and
    free space where intake measures it: the spool's file system (``spool_dir``, which a group of
    nodes may share on another mount, issue 16), not the data directory's. Where the two lie on
    different file systems the data directory's free space is reported too: intake does not watch
    it, and a job store that cannot commit stops the node as surely as a full spool."""
    data_dir, spool_dir = config.data_dir, config.spool_dir
    rows = [_directory_row("data directory", data_dir, "data_dir")]
    if not spool_dir.absolute().is_relative_to(data_dir.absolute()):
        rows.append(_directory_row("spool directory", spool_dir, "spool_dir"))
    if any(d.exists() and not d.is_dir() for d in (data_dir, spool_dir)):
        return [*rows, skip("disk space", "not checked")]
    rows.append(_disk_row("disk space", spool_dir, config, "intake refuses every photo (0xA700)",
                          "intake starts refusing photos", "intake refuses photos below"))
    if not _same_file_system(data_dir, spool_dir):
        rows.append(_disk_row("data disk space", data_dir, config,
                              "the job store may fail to commit (intake watches only the spool's disk)",
                              "the job store may fail to commit", "held to intake's watermark,"))
    return rows


# --------------------------------------------------------------------------- ports


def port_rows(config: NodeConfig) -> list[CheckRow]:
    wanted: list[tuple[str, str, str, int]] = []  # (row, key, address, port)
    listener = config.listener
    if listener.plain:
        wanted.append(("port dicom", "port", config.bind_address, config.port))
    if config.tls.enabled and config.tls.port:
        wanted.append(("port dicom-tls", "tls.port", config.bind_address, config.tls.port))
    if config.http.enabled and config.http.port:
        wanted.append(("port http", "http.port", config.http.bind_address, config.http.port))
    rows = []
    for row, key, address, port in wanted:
        state = port_state(address, port, config.health_path)
        where = f"{address}:{port}"
        if state.free:
            rows.append(ok(row, f"{where} is free"))
        elif state.holder_pid is not None:
            rows.append(ok(row, f"{where} is held by the running node (pid {state.holder_pid})"))
        else:
            rows.append(fail(row, f"{where}: {state.problem}",
                             f"stop what holds it (`ss -ltnp 'sport = :{port}'` names it) or choose another {key}"))
    return rows


# --------------------------------------------------------------------------- destinations


def destination_row(config: NodeConfig, destination: Destination) -> list[CheckRow]:
    """The node's own C-ECHO (as ``dicom-node echo``), or QIDO-RS for a DICOMweb root."""
    name = f"destination {destination.name}"
    fix = (f"start {destination.describe()}, or correct [[destinations]] {destination.name!r}; the peer must "
           f"accept the node's AE title {config.ae_title}; retry with `dicom-node echo {destination.name}`")
    started = time.perf_counter()
    if destination.is_dicomweb:
        try:
            answer = stow.echo(destination, timeout_s=NETWORK_TIMEOUT_S)
        except stow.StowError as exc:
            return [fail(name, f"QIDO-RS: {exc}", fix)]
        elapsed = time.perf_counter() - started
        if not answer.reachable:
            return [fail(name, f"QIDO-RS {destination.url}/studies: {answer.describe()}", fix)]
        detail = f"QIDO-RS {destination.url}: {answer.describe()} in {elapsed:.2f} s"
        warnings = stow.start_warnings(destination)
        if warnings:
            return [warn(name, f"{detail}; " + "; ".join(warnings), f"correct [[destinations]] {destination.name!r}")]
        return [ok(name, detail)]
    try:
        code = echo(dimse_peer(destination), config.ae_title, timeout_s=NETWORK_TIMEOUT_S)
    except AssociationError as exc:
        return [fail(name, f"C-ECHO: {exc}", fix)]
    elapsed = time.perf_counter() - started
    detail = f"C-ECHO {destination.describe()}: {dicom_status.describe(code)} in {elapsed:.2f} s"
    return [ok(name, detail) if dicom_status.is_success(code) else fail(name, detail, fix)]


# --------------------------------------------------------------------------- TLS files


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def _expiry(path: Path, ca_file: bool, now: datetime) -> tuple[Status, str]:
    """The worst validity problem among the certificates of one PEM file. In a CA file one
    expired CA among valid ones is a warning (the others still verify peers); a certificate chain
    the node shows fails its peers' verification if any of it is out of date."""
    certificates = x509.load_pem_x509_certificates(path.read_bytes())
    expired, soon, not_yet = [], [], []
    for cert in certificates:
        subject = cert.subject.rfc4514_string()
        after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
        if after < now:
            expired.append(f"{path}: {subject} expired on {_day(after)}")
        elif before > now:
            not_yet.append(f"{path}: {subject} is not valid before {_day(before)}")
        elif after - now < timedelta(days=EXPIRY_WARNING_DAYS):
            soon.append(f"{path}: {subject} expires on {_day(after)} (in {(after - now).days} days)")
    all_bad = len(expired) + len(not_yet) == len(certificates)
    if (expired or not_yet) and (not ca_file or all_bad):
        return Status.FAIL, "; ".join(expired + not_yet)
    if expired or not_yet or soon:
        return Status.WARN, "; ".join(expired + not_yet + soon)
    until = min(cert.not_valid_after_utc for cert in certificates)
    return Status.OK, f"{path.name} valid until {_day(until)}"


def _tls_row(name: str, build: Callable[[], object], files: list[tuple[Path, bool]], renew: str) -> CheckRow:
    """``build`` is the context builder the node uses (readable, PEM, key matches certificate)."""
    try:
        build()
    except (TlsFilesError, stow.StowError) as exc:
        return fail(name, str(exc), "replace the file named (PEM, unencrypted key, the key of that certificate)")
    now = datetime.now(UTC)
    worst, details = Status.OK, []
    for path, ca_file in files:
        status, text = _expiry(path, ca_file, now)
        details.append(text)
        if status is Status.FAIL or (status is Status.WARN and worst is Status.OK):
            worst = status
    detail = "; ".join(details)
    if worst is Status.OK:
        return ok(name, f"readable, key matches; {detail}")
    return CheckRow(name, worst, detail, renew)


def tls_rows(config: NodeConfig) -> list[CheckRow]:
    rows = []
    tls = config.tls
    if tls.enabled and tls.certificate is not None and tls.private_key is not None:
        files = [(tls.certificate, False)] + ([(tls.ca_certificates, True)] if tls.ca_certificates else [])
        rows.append(_tls_row("tls listener", lambda: server_context(tls), files,
                             "renew the certificate (same file names), then `kill -HUP <node pid>`: new "
                             "connections get it without a restart"))
    for destination in config.destinations:
        files = [(p, p == destination.ca_certificates)
                 for p in (destination.certificate, destination.ca_certificates) if p is not None]
        renew = f"renew the files of [[destinations]] {destination.name!r}; sends read them anew each time"
        if destination.tls and destination.ca_certificates is not None:
            build = functools.partial(client_context, destination.ca_certificates, destination.certificate,
                                      destination.private_key)
            rows.append(_tls_row(f"tls {destination.name}", build, files, renew))
        elif destination.is_https and files:
            rows.append(_tls_row(f"tls {destination.name}", functools.partial(stow.ssl_context, destination), files,
                                 renew))
    return rows


# --------------------------------------------------------------------------- the Orthanc rule


def orthanc_rows(config: NodeConfig, config_path: Path) -> list[CheckRow]:
    """A mismatch is a warning: the node itself works, but the PACS in front of it will not send it
    photos (or would loop), which only shows once a photo goes missing."""
    orthanc_dir = orthanc_dir_for(config_path)
    if not (orthanc_dir / ORTHANC_CONFIG).is_file():
        return [skip("orthanc rule", f"not checked: no {orthanc_dir / ORTHANC_CONFIG} beside the configuration")]
    try:
        rule = read_rule(orthanc_dir)
    except OrthancRuleError as exc:
        return [warn("orthanc rule", str(exc), f"repair the Orthanc example in {orthanc_dir} (see its README)")]
    problems = []
    entry = f"{rule.config_path.name} DicomModalities.{rule.modality}"
    if rule.modality_aet != config.ae_title:
        problems.append(f"{entry} has AET {rule.modality_aet}, the node's ae_title is {config.ae_title}")
    if rule.modality_tls and not config.tls.enabled:
        problems.append(f"{entry} uses DICOM TLS, the node has no TLS listener")
    expected_port = config.tls.port if rule.modality_tls else config.port
    if not rule.modality_tls and not config.listener.plain:
        problems.append(f"{entry} sends plain DICOM, the node listens only over TLS (tls.plain_listener = false)")
    elif rule.modality_port != expected_port:
        problems.append(f"{entry} sends to port {rule.modality_port}, the node listens on {expected_port}")
    if is_loopback(config.bind_address) and not is_loopback(rule.modality_host):
        problems.append(f"{entry} sends to {rule.modality_host}, the node listens on {config.bind_address} only")
    if rule.guard_aet is not None and rule.guard_aet != config.ae_title:
        problems.append(f"{rule.lua_path.name} NODE_AET is {rule.guard_aet}: its loop guard does not know the "
                        f"node's AE title {config.ae_title}")
    if not any(c.ae_title == rule.orthanc_aet for c in config.callers):
        problems.append(f"Orthanc's DicomAet {rule.orthanc_aet} is not in [[callers]]: the node refuses its photos")
    back = [d for d in config.destinations if d.ae_title == rule.orthanc_aet]
    if not back:
        problems.append(f"no destination has Orthanc's AE title {rule.orthanc_aet}: results do not go back to it")
    elif not any(d.port == rule.orthanc_port for d in back):
        problems.append(f"destination {back[0].name} sends to port {back[0].port}, Orthanc's DicomPort is "
                        f"{rule.orthanc_port}")
    if problems:
        return [warn("orthanc rule", "; ".join(problems),
                     f"make {rule.config_path} and {rule.lua_path} agree with the node's configuration (AE titles, "
                     "ports), or the configuration with them")]
    return [ok("orthanc rule", f"{rule.lua_path.name} forwards photos to {rule.modality} = "
                               f"{rule.modality_aet}@{rule.modality_host}:{rule.modality_port} (this node); "
                               f"Orthanc {rule.orthanc_aet} is a caller and a destination")]


# --------------------------------------------------------------------------- running them


def _run(tasks: list[tuple[str, Task]], deadline_s: float) -> list[CheckRow]:
    """Every task in a daemon thread of its own; rows in task order. A task still running at the
    deadline is reported as failed and left behind (the process exits without waiting for it)."""
    results: dict[int, list[CheckRow]] = {}

    def one(index: int, name: str, task: Task) -> None:
        try:
            results[index] = task()
        except Exception as exc:  # a bug or a surprise in one check must not hide the others
            results[index] = [fail(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                                   "report this as a bug of `dicom-node check`")]

    threads = [threading.Thread(target=one, args=(i, name, task), name=f"check-{name}", daemon=True)
               for i, (name, task) in enumerate(tasks)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    rows: list[CheckRow] = []
    for i, (name, _) in enumerate(tasks):
        if i in results:
            rows.extend(results[i])
        else:
            rows.append(fail(name, f"no answer within {deadline_s:.0f} s",
                             "run the check again with --log-level DEBUG to see where it waits"))
    return rows


def check_installation(path: Path | None, deadline_s: float = DEADLINE_S) -> list[CheckRow]:
    """Every check of the installation configured by ``path`` (``--config``), in display order."""
    config_path = chosen_config_path(path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [fail("configuration", str(exc), "correct the configuration as the message says "
                                                "(config/node.example.toml explains every key), then check again")]
    tasks: list[tuple[str, Task]] = [
        ("model", lambda: model_rows(config)),
        ("storage", lambda: storage_rows(config)),
        ("ports", lambda: port_rows(config)),
    ]
    for destination in config.destinations:
        tasks.append((f"destination {destination.name}", functools.partial(destination_row, config, destination)))
    tasks.append(("tls", lambda: tls_rows(config)))
    tasks.append(("orthanc rule", lambda: orthanc_rows(config, config_path)))
    return [_config_row(config, config_path), *_run(tasks, deadline_s)]
