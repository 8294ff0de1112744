"""Real processes for the node's tests: Orthanc, dcmtk peers and ``dicom-node serve`` as a subprocess.

Import what a test file needs (``from tests.node_fixtures import ...``); the pytest fixtures are
re-exported there so pytest finds them. Every wait is bounded: a test fails with a message rather
than hanging.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ORTHANC_EXAMPLE = REPO / "config" / "orthanc" / "orthanc.json"
ORTHANC_LUA = REPO / "config" / "orthanc" / "route-photos.lua"

NODE_AET = "DICOM_NODE"
PACS_AET = "ORTHANC"
SCU_AET = "TESTSCU"  # the test's modality: allowed by Orthanc (as "camera") and by the node
PHI_VALUES = ("Test^Photo", "PHOTO-TEST-001", "Zyxwvut^Secretname", "PID-SECRET-4711")
SECRET_PATIENT = {"PatientName": "Zyxwvut^Secretname", "PatientID": "PID-SECRET-4711"}

# A node's first start with runtime "auto" measures every candidate runtime on the model (issue 17:
# on a CPU with bf16 that is openvino, openvino-bf16, eager-bf16 and eager-int8), once per session's
# model; on 2 cores shared with other test processes that took up to ~60 s.
PROCESS_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a peer still starting: keep polling
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages dcmtk, orthanc, dicom3tools)")


# --------------------------------------------------------------------------- TOML (test configs only)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for node configurations: scalars, lists, tables and arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, list):
            for item in value:
                lines.append(f"\n[[{name}]]")
                lines.append(to_toml(item, prefix=f"{name}.").strip())
        else:
            lines.append(f"\n[{name}]")
            lines.append(to_toml(value, prefix=f"{name}.").strip())
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- dcmtk


def storescu(files: list[Path], port: int, calling_aet: str = SCU_AET, called_aet: str = NODE_AET,
             timeout_s: float = PROCESS_TIMEOUT_S, jpeg: bool = False) -> subprocess.CompletedProcess:
    """dcmtk storescu; ``jpeg`` proposes JPEG (``-xy``), which dcmtk needs for JPEG files."""
    args = ["storescu", "-aet", calling_aet, "-aec", called_aet, "-to", "20", "-ta", "20", "-td", "20"]
    if jpeg:
        args.append("-xy")
    args += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)


class StoreSCP:
    """dcmtk storescp writing what it receives to a directory (a minimal real PACS for dispatch tests)."""

    def __init__(self, directory: Path, port: int | None = None, aet: str = "STORESCP",
                 accept_compressed: bool = True, fork: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.aet = aet
        self.accept_compressed = accept_compressed
        self.fork = fork  # one process per association (parallel senders)
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        need_tools("storescp", "echoscu")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = open(self.directory.parent / f"storescp-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["storescp", "-aet", self.aet, "-od", str(self.directory), *(["+xa"] if self.accept_compressed else []),
             *(["--fork"] if self.fork else []), "-dhl", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(self._echo, 20, f"storescp on port {self.port}")
        return self

    def _echo(self) -> bool:
        done = subprocess.run(["echoscu", "-aec", self.aet, "127.0.0.1", str(self.port)], capture_output=True,
                              timeout=10)
        return done.returncode == 0

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


# --------------------------------------------------------------------------- Orthanc


class Orthanc:
    """Orthanc from the shipped example configuration and routing rule, on free ports, fresh storage."""

    def __init__(self, workdir: Path, node_port: int) -> None:
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.node_port = node_port
        self.process: subprocess.Popen | None = None
        config = json.loads(ORTHANC_EXAMPLE.read_text())
        config.update(
            StorageDirectory=str(workdir / "storage"),
            IndexDirectory=str(workdir / "storage"),
            DicomPort=self.dicom_port,
            HttpPort=self.http_port,
            LuaScripts=[str(ORTHANC_LUA)],
        )
        config["DicomModalities"]["node"]["Port"] = node_port
        config["DicomModalities"]["camera"]["AET"] = SCU_AET
        self.config_path = workdir / "orthanc.json"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))
        self.url = f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        need_tools("Orthanc")
        self.log = open(self.workdir / "orthanc.log", "a")  # noqa: SIM115
        self.process = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_until(lambda: self.get("/system"), 30, "Orthanc's REST API")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def download(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=30) as response:
            return response.read()

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study (with its main tags), or [] when Orthanc does not hold it."""
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        if not found:
            return []
        return self.get(f"/studies/{found[0]}/instances")

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}))


# --------------------------------------------------------------------------- the node


def node_config(data_dir: Path, model_dir: Path, port: int, pacs_port: int, **overrides: Any) -> dict[str, Any]:
    """A test node: fast retries, Orthanc and the test SCU as callers, results to the PACS."""
    config: dict[str, Any] = {
        "ae_title": NODE_AET,
        "port": port,
        "node_id": "testnode",
        "data_dir": str(data_dir),
        "model_dir": str(model_dir),
        "auto_fetch_model": False,
        "callers": [
            {"ae_title": PACS_AET, "host": "127.0.0.1", "return_to": "pacs"},
            {"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "pacs"},
        ],
        "destinations": [{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port}],
        "http": {"port": 0},  # any free port: two test nodes (or a test and a bench) never collide on 8080
        "worker": {"restart_delay_s": 0.5, "poll_interval_s": 0.05},
        "dispatch": {"backoff_initial_s": 0.5, "backoff_factor": 2.0, "backoff_max_s": 2.0, "max_attempts": 100,
                     "timeout_s": 15.0, "poll_interval_s": 0.05},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class NodeProcess:
    """``python -m dicom_node serve`` as a child process, its log in a file."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = workdir / "node.log"
        self.process: subprocess.Popen | None = None
        self.port = int(config["port"])
        self.data_dir = Path(config["data_dir"])

    def start(self, wait_ready: bool = True, timeout_s: float = PROCESS_TIMEOUT_S,
              own_process_group: bool = False) -> NodeProcess:
        """``own_process_group``: the node leads a process group of its own (signal it as systemd does)."""
        log = open(self.log_path, "a")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [PYTHON, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=own_process_group,
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            health = json.loads((self.data_dir / "health.json").read_text())
        except (OSError, ValueError):
            return None
        return health if self.process is not None and health.get("pid") == self.process.pid else None

    def wait_listening(self, timeout_s: float = PROCESS_TIMEOUT_S) -> None:
        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the node exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout_s, f"the node to listen on {self.port}")

    def wait_ready(self, timeout_s: float = PROCESS_TIMEOUT_S) -> dict[str, Any]:
        self.wait_listening(timeout_s)

        def ready() -> dict[str, Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the node exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            health = self.health()
            return health if health and health.get("ready") else None

        return wait_until(ready, timeout_s, "the node to report ready")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        code = self.process.returncode
        self.process = None
        return code

    def kill9(self) -> None:
        """SIGKILL the node process only (its workers must die with it on their own)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def jobs(self) -> list[Any]:
        from dicom_node.queue.sqlite_store import SqliteJobStore

        store = SqliteJobStore(self.data_dir / "jobs.sqlite3")
        try:
            return store.list_jobs(limit=10_000)
        finally:
            store.close()

    def wait_jobs_final(self, count: int, timeout_s: float) -> list[Any]:
        """Wait until ``count`` jobs exist and all are done or failed."""
        def final() -> list[Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the node exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            jobs = self.jobs()
            if len(jobs) >= count and all(j.state.value in ("done", "failed") for j in jobs):
                return jobs
            return None

        return wait_until(final, timeout_s, f"{count} jobs to finish (node log: {self.log_path})", interval_s=0.3)


def assert_no_patient_data(text: str) -> None:
    """Logs carry UIDs and job ids, never patient names or IDs."""
    for value in PHI_VALUES:
        for form in {value, value.replace("^", " ")}:
            assert form not in text, f"patient data {form!r} found in the log"


def write_photos(datasets: list[Dataset], directory: Path) -> list[Path]:
    from tests.photo_factory import write_dataset

    return [write_dataset(ds, directory / f"photo_{i:02d}_{ds.SOPInstanceUID[-8:]}.dcm")
            for i, ds in enumerate(datasets)]


def read(path_or_bytes: Path | bytes) -> Dataset:
    if isinstance(path_or_bytes, bytes):
        from io import BytesIO

        return pydicom.dcmread(BytesIO(path_or_bytes))
    return pydicom.dcmread(path_or_bytes)


def uids_in(ds: Dataset) -> set[str]:
    """Every UI value anywhere in a dataset (references included)."""
    found: set[str] = set()

    def walk(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.VR == "UI" and element.value:
                values = element.value if element.VM > 1 else [element.value]
                found.update(str(v) for v in values)

    walk(ds)
    return found


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def node_port() -> int:
    """The port every test node listens on (Orthanc's 'node' modality points at it)."""
    return free_port()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory, node_port: int) -> Iterator[Orthanc]:
    need_tools("Orthanc", "storescu", "dciodvfy")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), node_port).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def running_orthanc(orthanc: Orthanc) -> Orthanc:
    """The session's Orthanc, restarted if a previous test left it stopped."""
    if not orthanc.running:
        orthanc.start()
    return orthanc


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Make :class:`NodeProcess` objects; every one still running at the end is stopped."""
    made: list[NodeProcess] = []

    def make(config: dict[str, Any], name: str = "node") -> NodeProcess:
        node = NodeProcess(tmp_path / name, config)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


# --------------------------------------------------------------------------- forged codestream headers


def forge_frame_size(frame: bytes, rows: int, columns: int) -> bytes:
    """``frame`` (JPEG, JPEG-LS or JPEG 2000 codestream) with its frame header claiming ``columns`` x
    ``rows``: what a lying encoder (or an attacker) sends. The entropy-coded data is left as it was."""
    data = bytearray(frame)
    if data[:4] == b"\xff\x4f\xff\x51":  # J2K SOC + SIZ: Xsiz, Ysiz at bytes 8 and 12; offsets follow
        x_offset, y_offset = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        data[8:12] = (columns + x_offset).to_bytes(4, "big")
        data[12:16] = (rows + y_offset).to_bytes(4, "big")
        return bytes(data)
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3", b"\xff\xf7"):  # SOF0-3, SOF55
        at = data.find(marker)
        if at >= 0:  # the codestreams made in the tests carry no APP segment that could hold these bytes
            data[at + 5:at + 7] = rows.to_bytes(2, "big")
            data[at + 7:at + 9] = columns.to_bytes(2, "big")
            return bytes(data)
    raise ValueError("no frame header found to forge")


def header_bomb(claimed_rows: int = 26000, claimed_columns: int = 26000, transfer_syntax: str | None = None) -> Dataset:
    """A small 640 x 480 JPEG Baseline (or ``transfer_syntax``) VL photo whose codestream's frame header
    claims ``claimed_columns`` x ``claimed_rows`` while Rows/Columns say 480/640: a few kilobytes
    that make an unguarded decoder allocate gigabytes."""
    import numpy as np
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGBaseline8Bit

    from tests.photo_factory import make_vl_photo

    ds = make_vl_photo(np.full((480, 640, 3), 120, np.uint8), transfer_syntax or JPEGBaseline8Bit)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([forge_frame_size(frame, claimed_rows, claimed_columns)])
    return ds


# --------------------------------------------------------------------------- Orthanc with DICOMweb (helper C)

ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class DicomWebOrthanc(Orthanc):
    """The shipped Orthanc configuration plus its DICOMweb plugin at ``/dicom-web/`` (STOW-RS,
    QIDO-RS, WADO-RS): :attr:`dicomweb_url` is the root a ``kind = "dicomweb"`` destination or a
    viewer points at.

    ``users`` ({name: password}) turns on HTTP basic authentication (``AuthenticationEnabled`` +
    ``RegisteredUsers``); the helper's own REST calls (``get``, ``post``, ``download``, ``has_instance``)
    then sign in as the first user. ``routing``: keep the shipped Lua rule that forwards VL photos
    to the node (off by default, so photos stored here by a test go nowhere). ``http_port`` pins the
    port (restart on the same one). No HTTPS: Orthanc 1.10.1's ``SslEnabled`` segfaults (exit 139)
    on its first HTTPS request on Debian 12.
    """

    def __init__(self, workdir: Path, node_port: int | None = None, users: dict[str, str] | None = None,
                 routing: bool = False, http_port: int | None = None) -> None:
        super().__init__(workdir, node_port if node_port is not None else free_port())
        if http_port is not None:
            self.http_port = http_port
        self.users = dict(users or {})
        config = json.loads(self.config_path.read_text())
        config.update(HttpPort=self.http_port, Plugins=[str(ORTHANC_DICOMWEB_PLUGIN)],
                      DicomWeb={"Enable": True, "Root": "/dicom-web/"})
        if not routing:
            config.pop("LuaScripts", None)
        if self.users:
            config.update(AuthenticationEnabled=True, RegisteredUsers=self.users)
        self.config_path.write_text(json.dumps(config, indent=2))
        self.url = f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> DicomWebOrthanc:
        if not ORTHANC_DICOMWEB_PLUGIN.is_file():
            pytest.skip(f"needs {ORTHANC_DICOMWEB_PLUGIN} (Debian package orthanc-dicomweb)")
        super().start()
        return self

    def _open(self, path: str, body: bytes | None = None, timeout_s: float = 30.0) -> bytes:
        import base64

        request = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET")
        if self.users:
            name, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read()

    def get(self, path: str) -> Any:
        return json.loads(self._open(path, timeout_s=10))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self._open(path, json.dumps(body).encode()))

    def download(self, instance_id: str) -> bytes:
        return self._open(f"/instances/{instance_id}/file")

    def sop_instance_uids(self) -> set[str]:
        """Every SOP Instance UID Orthanc holds."""
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances")}
