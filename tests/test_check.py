"""``dicom-node check`` against a real test installation, and with one thing broken at a time.

The installation: the tiny untrained model (``model make-test``), a real Orthanc started from the
shipped ``config/orthanc`` files (its ``orthanc.json`` in ``orthanc/`` beside the node's
configuration, as ``config/orthanc`` sits beside ``config/node.toml``) as the destination, a TLS
listener with certificates made by ``openssl``, and ports that are free. Every variant is the same
configuration with one change, written to a folder of its own (no Orthanc rule beside it, so the
rule is "not checked" there) and checked by the real command in a subprocess.

The healthy install uses ``[worker] runtime = "eager"``: with ``auto`` a fresh install honestly
warns that the runtime is still to be measured at first start (:func:`test_unmeasured_runtime_warns`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dicom_node.intake.watermark import MB, free_bytes
from tests.node_fixtures import REPO, NodeProcess, Orthanc, free_port, need_tools, node_config, to_toml, wait_until

DICOM_NODE = REPO / ".venv" / "bin" / "dicom-node"
CHECK_TIMEOUT_S = 60
EVERY_ROW = ("configuration", "model", "runtime", "data directory", "disk space", "port dicom", "port dicom-tls",
             "port http", "destination pacs", "tls listener", "orthanc rule")
_ROW = re.compile(r"^(?P<name>\S(?:.*?\S)?)\s{2,}(?P<status>OK|WARN|FAIL|SKIP)\s{2,}(?P<detail>.*)$")


# --------------------------------------------------------------------------- certificates (openssl)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @classmethod
    def make(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory)
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(pki.ca_key), "-out", str(pki.ca), "-days", "400", "-subj", "/O=Test Hospital/CN=Test CA")
        return pki

    def leaf(self, stem: str, days: int) -> tuple[Path, Path]:
        """A certificate signed by the CA, valid from now for ``days`` (SAN IP:127.0.0.1)."""
        key, csr, cert = (self.directory / f"{stem}.{ext}" for ext in ("key", "csr", "pem"))
        extensions = self.directory / f"{stem}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                "-out", str(csr), "-subj", f"/O=Test Hospital/CN={stem}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key), "-CAcreateserial",
                "-out", str(cert), "-days", str(days), "-extfile", str(extensions))
        return cert, key

    def expired_leaf(self, stem: str) -> tuple[Path, Path, datetime.datetime]:
        """A certificate that expired yesterday, signed by the same CA (OpenSSL 3.0's command line
        cannot back-date one, so ``cryptography`` signs it with the CA's key)."""
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        expired_on = now - datetime.timedelta(days=1)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=60)).not_valid_after(expired_on)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path, cert.not_valid_after_utc


# --------------------------------------------------------------------------- running the command


@dataclass(frozen=True)
class Row:
    status: str
    detail: str
    fix: str


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    rows: dict[str, Row]

    def not_ok(self) -> dict[str, Row]:
        return {name: row for name, row in self.rows.items() if row.status not in ("OK", "SKIP")}

    def explain(self) -> str:
        return f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"


def parse_table(stdout: str) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    current: str | None = None
    for line in stdout.splitlines():
        match = _ROW.match(line)
        if match and match["name"] != "CHECK":
            current = match["name"]
            rows[current] = Row(match["status"], match["detail"], "")
        elif current is not None and line.strip().startswith("FIX: "):
            row = rows[current]
            rows[current] = Row(row.status, row.detail, line.strip().removeprefix("FIX: "))
    return rows


def run_check(config_path: Path) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    done = subprocess.run([str(DICOM_NODE), "check", "--config", str(config_path)], capture_output=True, text=True,
                          timeout=CHECK_TIMEOUT_S, cwd=REPO, env=env)
    return Outcome(done.returncode, done.stdout, done.stderr, parse_table(done.stdout))


def check_variant(directory: Path, config: dict[str, Any], **changes: Any) -> Outcome:
    """The healthy configuration with ``changes`` (sections merged), checked from a folder of its own."""
    variant = json.loads(json.dumps(config))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(variant.get(key), dict):
            variant[key] = {**variant[key], **value}
        else:
            variant[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "node.toml"
    path.write_text(to_toml(variant))
    return run_check(path)


# --------------------------------------------------------------------------- the healthy install


@dataclass(frozen=True)
class Install:
    directory: Path
    config: dict[str, Any]
    config_path: Path
    orthanc: Orthanc
    pki: Pki


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory, small_model_dir: Path) -> Iterator[Install]:
    need_tools("Orthanc", "openssl")
    directory = tmp_path_factory.mktemp("install")
    pki = Pki.make(directory / "pki")
    cert, key = pki.leaf("dicom-node", days=365)
    node_port = free_port()
    orthanc = Orthanc(directory / "orthanc", node_port).start()  # writes orthanc/orthanc.json beside node.toml
    data_dir = directory / "data"
    data_dir.mkdir()
    config = node_config(data_dir, small_model_dir, node_port, orthanc.dicom_port,
                         worker={"runtime": "eager"}, http={"port": free_port()},
                         tls={"enabled": True, "port": free_port(), "certificate": str(cert), "private_key": str(key),
                              "ca_certificates": str(pki.ca)})
    config_path = directory / "node.toml"
    config_path.write_text(to_toml(config))
    try:
        yield Install(directory, config, config_path, orthanc, pki)
    finally:
        orthanc.stop()


def test_a_healthy_test_install_is_all_ok(install: Install) -> None:
    outcome = run_check(install.config_path)
    assert outcome.returncode == 0, outcome.explain()
    assert set(outcome.rows) == set(EVERY_ROW), outcome.explain()
    assert all(row.status == "OK" for row in outcome.rows.values()), outcome.explain()
    assert f"{len(EVERY_ROW)} ok, 0 warnings, 0 failures" in outcome.stdout
    assert "UNTRAINED test model" in outcome.rows["model"].detail  # ok, but never silently
    assert "0x0000 (success)" in outcome.rows["destination pacs"].detail  # a real C-ECHO answered by the real Orthanc
    assert f"ORTHANC@127.0.0.1:{install.orthanc.dicom_port}" in outcome.rows["destination pacs"].detail
    assert "this node" in outcome.rows["orthanc rule"].detail
    assert outcome.stderr == "", outcome.stderr


# --------------------------------------------------------------------------- one problem each


def test_a_destination_that_does_not_answer_fails(install: Install, tmp_path: Path) -> None:
    dead_port = free_port()  # nothing listens there
    destinations = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dead_port}]
    outcome = check_variant(tmp_path, install.config, destinations=destinations)
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"destination pacs"}, outcome.explain()
    row = outcome.rows["destination pacs"]
    assert row.status == "FAIL" and f"ORTHANC@127.0.0.1:{dead_port}" in row.detail
    assert "dicom-node echo pacs" in row.fix
    assert "1 failures" in outcome.stdout


def test_an_expired_certificate_fails_naming_the_file_and_the_date(install: Install, tmp_path: Path) -> None:
    cert, key, expired_on = install.pki.expired_leaf("expired-node")
    outcome = check_variant(tmp_path, install.config, tls={"certificate": str(cert), "private_key": str(key)})
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"tls listener"}, outcome.explain()
    row = outcome.rows["tls listener"]
    assert row.status == "FAIL"
    assert str(cert) in row.detail and f"expired on {expired_on:%Y-%m-%d}" in row.detail, row.detail
    assert "kill -HUP" in row.fix


def test_a_certificate_expiring_within_30_days_warns(install: Install, tmp_path: Path) -> None:
    cert, key = install.pki.leaf("soon-node", days=10)
    outcome = check_variant(tmp_path, install.config, tls={"certificate": str(cert), "private_key": str(key)})
    assert outcome.returncode == 1, outcome.explain()
    assert set(outcome.not_ok()) == {"tls listener"}, outcome.explain()
    row = outcome.rows["tls listener"]
    assert row.status == "WARN" and str(cert) in row.detail and "expires on" in row.detail, row.detail


def test_a_key_that_does_not_match_its_certificate_fails(install: Install, tmp_path: Path) -> None:
    _, other_key = install.pki.leaf("other-node", days=365)
    outcome = check_variant(tmp_path, install.config, tls={"private_key": str(other_key)})
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"tls listener"}, outcome.explain()
    assert "does not belong to the certificate" in outcome.rows["tls listener"].detail


def test_a_missing_model_fails_and_says_how_to_install_it(install: Install, tmp_path: Path) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    outcome = check_variant(tmp_path / "install", install.config, model_dir=str(empty))
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"model"}, outcome.explain()
    row = outcome.rows["model"]
    assert str(empty) in row.detail and "pytorch_model.pt" in row.detail
    assert f"dicom-node model fetch --dir {empty}" in row.fix and "model make-test" in row.fix
    assert outcome.rows["runtime"].status == "SKIP"


def test_weights_that_are_not_the_fetched_ones_fail(install: Install, small_model_dir: Path, tmp_path: Path) -> None:
    """``model fetch`` records the weights' sha256 and state-dict digest; a model whose tensors are
    not the recorded ones (replaced, or damaged in a way that still loads) is not the installed model."""
    model = tmp_path / "model"
    shutil.copytree(small_model_dir, model, ignore=shutil.ignore_patterns("runtime-cache"))
    weights_sha256 = hashlib.sha256((model / "pytorch_model.pt").read_bytes()).hexdigest()
    record = {"sha256": weights_sha256, "state_dict_digest": "0123456789abcdef" * 4}
    (model / "dicom_node-model.json").write_text(json.dumps(record))
    outcome = check_variant(tmp_path / "install", install.config, model_dir=str(model))
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"model"}, outcome.explain()
    assert "not the one `model fetch` recorded (0123456789abcdef" in outcome.rows["model"].detail
    assert "model fetch --dir" in outcome.rows["model"].fix


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs, unmounted afterwards (as tests/test_disk_full.py: the tests run as root)."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk check mounts a tmpfs and must run as root (as scripts/test.sh does in CI)")
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_fails_with_free_space_against_the_watermark(install: Install, small_disk: Path,
                                                                 tmp_path: Path) -> None:
    with open(small_disk / "filler", "wb") as out:
        out.write(b"\xa5" * (35 * MB))
    free_mb = round(free_bytes(small_disk) / MB)
    assert free_mb < 8
    outcome = check_variant(tmp_path / "install", install.config, data_dir=str(small_disk),
                            intake={"min_free_disk_mb": 8, "resume_free_disk_mb": 8})
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"disk space"}, outcome.explain()
    row = outcome.rows["disk space"]
    assert f"{free_mb} MB free in {small_disk}" in row.detail and "watermark of 8 MB" in row.detail, row.detail
    assert "16 MB" in row.fix  # where intake takes photos again
    # the same disk with room above the watermark is fine: the check reads the disk, not a number
    (small_disk / "filler").unlink()
    assert check_variant(tmp_path / "again", install.config, data_dir=str(small_disk),
                         intake={"min_free_disk_mb": 8, "resume_free_disk_mb": 8}).returncode == 0


def test_free_space_is_measured_where_intake_writes_the_spool(install: Install, small_disk: Path,
                                                                tmp_path: Path) -> None:
    """A spool on its own mount (issue 16's shared spool) is the disk intake watches: a full one fails
    the check although the data directory has room; a full data directory beside a roomy spool fails
    a row of its own (the job store lives there, and intake does not watch it)."""
    with open(small_disk / "filler", "wb") as out:
        out.write(b"\xa5" * (35 * MB))
    free_mb = round(free_bytes(small_disk) / MB)
    watermark = {"min_free_disk_mb": 8, "resume_free_disk_mb": 8}
    spool = small_disk / "spool"
    outcome = check_variant(tmp_path / "spool-full", install.config, data_dir=str(tmp_path / "node-data"),
                            spool_dir=str(spool), intake=watermark)
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"disk space"}, outcome.explain()
    assert f"{free_mb} MB free in {spool}" in outcome.rows["disk space"].detail
    assert outcome.rows["spool directory"].status == "OK", outcome.explain()
    assert "data disk space" in outcome.rows and outcome.rows["data disk space"].status == "OK", outcome.explain()

    data = small_disk / "data"
    outcome = check_variant(tmp_path / "data-full", install.config, data_dir=str(data),
                            spool_dir=str(tmp_path / "spool"), intake=watermark)
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"data disk space"}, outcome.explain()
    row = outcome.rows["data disk space"]
    assert f"{free_mb} MB free in {data}" in row.detail and "job store" in row.detail, row.detail


def test_a_port_held_by_another_process_fails(install: Install, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        outcome = check_variant(tmp_path, install.config, port=port)
    assert outcome.returncode == 2, outcome.explain()
    assert set(outcome.not_ok()) == {"port dicom"}, outcome.explain()
    assert f"127.0.0.1:{port}: in use by another process" in outcome.rows["port dicom"].detail


def test_ports_held_by_the_running_node_are_ok(install: Install, tmp_path: Path) -> None:
    """The node's own listeners are no conflict: ``check`` on a running node finds its pid in
    health.json holding each port."""
    ports = {"port": free_port(), "tls": {"port": free_port()}, "http": {"port": free_port()}}
    config = json.loads(json.dumps(install.config))
    # no workers: the node's listeners are what this is about, and a node without torch starts in a second
    for key, value in {**ports, "data_dir": str(tmp_path / "data"), "worker": {"count": 0}}.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    node = NodeProcess(tmp_path / "node", config).start(wait_ready=False)
    try:
        listening = [ports["port"], ports["tls"]["port"], ports["http"]["port"]]

        def accepts(port: int) -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        def up() -> bool:
            node.wait_listening()
            return node.health() is not None and all(accepts(port) for port in listening)

        wait_until(up, 60, "the node's three listeners and its health file")
        outcome = run_check(node.config_path)
        pid = node.process.pid if node.process is not None else None
    finally:
        node.stop()
    assert outcome.returncode == 0, outcome.explain()
    for row in ("port dicom", "port dicom-tls", "port http"):
        assert f"held by the running node (pid {pid})" in outcome.rows[row].detail, outcome.explain()


def test_unmeasured_runtime_warns(install: Install, tmp_path: Path, small_model_dir: Path) -> None:
    model = tmp_path / "model"  # a copy: no runtime-cache from other tests
    shutil.copytree(small_model_dir, model, ignore=shutil.ignore_patterns("runtime-cache"))
    outcome = check_variant(tmp_path / "install", install.config, model_dir=str(model), worker={"runtime": "auto"})
    assert outcome.returncode == 1, outcome.explain()
    assert set(outcome.not_ok()) == {"runtime"}, outcome.explain()
    assert "not measured yet" in outcome.rows["runtime"].detail


def test_an_orthanc_rule_pointing_elsewhere_warns(install: Install, tmp_path: Path) -> None:
    orthanc = json.loads((install.directory / "orthanc" / "orthanc.json").read_text())
    orthanc["DicomModalities"]["node"]["AET"] = "OLD_NODE"
    (tmp_path / "orthanc").mkdir()
    (tmp_path / "orthanc" / "orthanc.json").write_text(json.dumps(orthanc))
    outcome = check_variant(tmp_path, install.config)
    assert outcome.returncode == 1, outcome.explain()
    assert set(outcome.not_ok()) == {"orthanc rule"}, outcome.explain()
    assert "AET OLD_NODE" in outcome.rows["orthanc rule"].detail


def test_an_invalid_configuration_is_a_reported_failure(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('ae_title = "DICOM_NODE"\nport = 70000\n[dispatch]\nmax_atempts = 3\n')
    outcome = run_check(path)
    assert outcome.returncode == 2, outcome.explain()
    assert outcome.rows["configuration"].status == "FAIL"
    assert "port" in outcome.stdout and "dispatch.max_atempts" in outcome.stdout
    assert "Traceback" not in outcome.stdout + outcome.stderr
