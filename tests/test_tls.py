"""DICOM TLS both ways (PS3.15 Annex B.9), against dcmtk and Orthanc speaking TLS.

One node (``python -m dicom_node serve``, the tiny untrained model) runs for the module with a
plain and a TLS listener; its results go back over TLS to a dcmtk storescp that requires the
node's client certificate, and to Orthanc with ``DicomTlsEnabled``. Certificates are made here
with ``cryptography``: a CA, certificates it signs (the node's, the peers', two callers'), one
from another CA and an expired one.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.sop_class import VLPhotographicImageStorage  # type: ignore[attr-defined]

from dicom_node.config import ConfigError, NodeConfig, load_config
from dicom_node.dispatch.scu import AssociationError, Peer, echo
from dicom_node.intake.scp import IntakeSCP
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.net import status
from dicom_node.net.subjects import canonical_subject
from dicom_node.net.tls import BCP195_TLS12_CIPHERS, client_context
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import (
    NODE_AET,
    PYTHON,
    REPO,
    SCU_AET,
    NodeProcess,
    Orthanc,
    StoreSCP,
    free_port,
    need_tools,
    node_config,
    to_toml,
    uids_in,
    wait_until,
    write_photos,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb

ORG = "Test Hospital"
PINNED_AET = "PINNED"  # a caller pinned to the certificate subject of modality-a
ORTHANC_CALLER = "TOORTHANC"  # its results go to the TLS Orthanc
RESULT_MODALITIES = ["OT", "SEG", "SR"]
JOB_BUDGET_S = 60.0
LOG_WAIT_S = 10.0


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path
    serial: int


class Pki:
    """Test certificates (EC P-256): every leaf has SAN IP:127.0.0.1 and may serve or call."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert, self.ca = self._authority("ca", "Test CA")
        self.other_key, self.other_cert, self.other_ca = self._authority("other-ca", "Other CA")

    @staticmethod
    def _name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def _write(self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Credential:
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Credential(cert_path, key_path, cert.serial_number)

    def _authority(self, stem: str, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(self._name(cn)).issuer_name(self._name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert, self._write(stem, cert, key).cert

    def leaf(self, stem: str, cn: str, other_ca: bool = False, expired: bool = False) -> Credential:
        issuer_key, issuer = (self.other_key, self.other_cert) if other_ca else (self.ca_key, self.ca_cert)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = ((now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired
                      else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)))
        cert = (x509.CertificateBuilder().subject_name(self._name(cn)).issuer_name(issuer.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                               critical=False)
                .sign(issuer_key, hashes.SHA256()))
        return self._write(stem, cert, key)


# --------------------------------------------------------------------------- TLS peers


def tls_args(credential: Credential | None, ca: Path) -> list[str]:
    """dcmtk's options: authenticated TLS with ``credential`` (anonymous TLS without), trusting ``ca``."""
    auth = ["+tls", str(credential.key), str(credential.cert)] if credential is not None else ["+tla"]
    return [*auth, "+cf", str(ca)]


def dcmtk(tool: str, port: int, *args: str, calling: str = SCU_AET, called: str = NODE_AET,
          tls: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [tool, "-aet", calling, "-aec", called, "-to", "10", "-ta", "10", "-td", "10", *(tls or []),
               "127.0.0.1", str(port), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


class TlsStoreSCP(StoreSCP):
    """dcmtk storescp speaking only TLS and requiring a client certificate from ``ca`` (dcmtk's default)."""

    def __init__(self, directory: Path, server: Credential, ca: Path) -> None:
        super().__init__(directory)
        self.tls = tls_args(server, ca)
        self.client: Credential | None = None

    def start(self) -> TlsStoreSCP:
        need_tools("storescp", "echoscu")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = open(self.directory.parent / f"storescp-tls-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(["storescp", "-aet", self.aet, "-od", str(self.directory), "+xa",
                                         *self.tls, str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._echo, 20, f"storescp (TLS) on port {self.port}")
        return self

    def _echo(self) -> bool:
        assert self.client is not None, "set .client before start"
        ca = Path(self.tls[-1])
        return dcmtk("echoscu", self.port, called=self.aet, tls=tls_args(self.client, ca)).returncode == 0


def orthanc_with_tls(workdir: Path, node_port: int, server: Credential, ca: Path) -> Orthanc:
    """The shipped Orthanc configuration, its DICOM port speaking TLS only (client certificates required)."""
    orthanc = Orthanc(workdir, node_port)
    config = json.loads(orthanc.config_path.read_text())
    config.pop("LuaScripts", None)  # no routing: it only receives results here
    config.update(DicomTlsEnabled=True, DicomTlsCertificate=str(server.cert), DicomTlsPrivateKey=str(server.key),
                  DicomTlsTrustedCertificates=str(ca), DicomTlsRemoteCertificateRequired=True)
    config["DicomModalities"]["node"]["UseDicomTls"] = True
    orthanc.config_path.write_text(json.dumps(config, indent=2))
    return orthanc


# --------------------------------------------------------------------------- the module's node


@dataclass
class TlsSetup:
    pki: Pki
    node: NodeProcess
    tls_port: int
    node_cert: Credential  # the files the node's [tls] section names (replaced by the reload test)
    modality_a: Credential
    modality_b: Credential
    pacs: TlsStoreSCP
    orthanc: Orthanc
    workdir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, small_model_dir: Path) -> Iterator[TlsSetup]:
    need_tools("storescu", "storescp", "echoscu", "Orthanc")
    workdir = tmp_path_factory.mktemp("tls")
    pki = Pki(workdir / "pki")
    node_cert = pki.leaf("node", "dicom-node")
    peer_cert = pki.leaf("peer", "pacs")
    node_client = pki.leaf("node-client", "dicom-node-client")
    modality_a, modality_b = pki.leaf("modality-a", "modality-a"), pki.leaf("modality-b", "modality-b")
    pacs = TlsStoreSCP(workdir / "pacs", peer_cert, pki.ca)
    pacs.client = modality_a
    pacs.start()
    port, tls_port = free_port(), free_port()
    orthanc = orthanc_with_tls(workdir / "orthanc", tls_port, peer_cert, pki.ca).start()
    client = {"tls": True, "ca_certificates": str(pki.ca), "certificate": str(node_client.cert),
              "private_key": str(node_client.key)}
    config = node_config(
        workdir / "data", small_model_dir, port, orthanc.dicom_port,
        callers=[{"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "tlspacs"},
                 # spaces and lower case: the configured pin is canonicalised to the certificate's form
                 {"ae_title": PINNED_AET, "certificate_subject": f"cn=modality-a, o={ORG}", "return_to": "tlspacs"},
                 {"ae_title": ORTHANC_CALLER, "host": "127.0.0.1", "return_to": "orthanc"}],
        destinations=[{"name": "tlspacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port, **client},
                      {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                       **client},
                      {"name": "wrongca", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port,
                       **client, "ca_certificates": str(pki.other_ca)},
                      {"name": "noclientcert", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port,
                       "tls": True, "ca_certificates": str(pki.ca)}],
        tls={"enabled": True, "port": tls_port, "certificate": str(node_cert.cert),
             "private_key": str(node_cert.key), "ca_certificates": str(pki.ca)},
        worker={"count": 1, "torch_threads": 1, "runtime": "eager"},  # no OpenVINO export: a fast start
    )
    node = NodeProcess(workdir / "node", config)
    try:
        node.start()
        yield TlsSetup(pki, node, tls_port, node_cert, modality_a, modality_b, pacs, orthanc, workdir)
    finally:
        node.stop()
        orthanc.stop()
        pacs.stop()


def photo_file(directory: Path) -> tuple[Path, str]:
    photo = make_vl_photo(synthetic_rgb(64, 96))
    return write_photos([photo], directory)[0], str(photo.SOPInstanceUID)


def job_done(node: NodeProcess, sop_instance_uid: str) -> Any:
    def done() -> Any:
        job = next((j for j in node.jobs() if j.sop_instance_uid == sop_instance_uid), None)
        if job is not None and job.state.value == "failed":
            raise AssertionError(f"job failed: {job.reason}")
        return job if job is not None and job.state.value == "done" else None

    return wait_until(done, JOB_BUDGET_S, f"the job of {sop_instance_uid} (node log: {node.log_path})")


def log_line(node: NodeProcess, *parts: str) -> str:
    """The first node log line holding every one of ``parts`` (waited for: the node logs from its threads)."""
    def found() -> str | None:
        return next((line for line in node.log_text().splitlines() if all(p in line for p in parts)), None)

    return wait_until(found, LOG_WAIT_S, f"a node log line with {parts}", interval_s=0.1)


def echo_over_tls(s: TlsSetup, credential: Credential | None = None, calling: str = SCU_AET
                  ) -> subprocess.CompletedProcess:
    return dcmtk("echoscu", s.tls_port, calling=calling, tls=tls_args(credential or s.modality_a, s.pki.ca))


def peer_serial(port: int, ca: Path, client: Credential) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` is shown."""
    context = client_context(ca, client.cert, client.key)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


# --------------------------------------------------------------------------- both ways, real peers


def test_dcmtk_stores_over_tls_and_results_return_over_tls_with_the_nodes_client_certificate(
        setup: TlsSetup, tmp_path: Path) -> None:
    path, uid = photo_file(tmp_path)
    sent = dcmtk("storescu", setup.tls_port, str(path), tls=tls_args(setup.modality_a, setup.pki.ca))
    assert sent.returncode == 0, sent.stderr
    job = job_done(setup.node, uid)
    assert job.calling_ae == SCU_AET
    received = [pydicom.dcmread(p) for p in setup.pacs.files()]
    mine = sorted(ds.Modality for ds in received if uid in uids_in(ds))
    assert mine == RESULT_MODALITIES, f"results for {uid} at the TLS storescp: {mine}"
    log_line(setup.node, "event=intake.listening", "tls=true", f"port={setup.tls_port}")


def test_results_arrive_in_orthanc_over_tls(setup: TlsSetup, tmp_path: Path) -> None:
    path, uid = photo_file(tmp_path)
    sent = dcmtk("storescu", setup.tls_port, str(path), calling=ORTHANC_CALLER,
                 tls=tls_args(setup.modality_a, setup.pki.ca))
    assert sent.returncode == 0, sent.stderr
    job_done(setup.node, uid)
    photo = pydicom.dcmread(path)
    instances = setup.orthanc.study_instances(str(photo.StudyInstanceUID))
    modalities = sorted(pydicom.dcmread(io.BytesIO(setup.orthanc.download(i["ID"]))).Modality
                        for i in instances if i["MainDicomTags"]["SOPInstanceUID"] != uid)
    assert modalities == RESULT_MODALITIES


def test_echo_command_reaches_tls_destinations_and_verifies_them(setup: TlsSetup) -> None:
    def echo(destination: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "dicom_node", "echo", destination, "--config",
                               str(setup.node.config_path), "--timeout", "10"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    for destination in ("orthanc", "tlspacs"):
        done = echo(destination)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0x0000" in done.stdout
    wrong_ca = echo("wrongca")  # storescp's certificate is not from the CA this destination trusts
    assert wrong_ca.returncode == 1
    assert "certificate verify failed" in wrong_ca.stderr, wrong_ca.stderr
    assert "Traceback" not in wrong_ca.stderr
    no_cert = echo("noclientcert")  # storescp requires a client certificate
    assert no_cert.returncode == 1
    assert "over TLS" in no_cert.stderr and "certificate required" in no_cert.stderr, no_cert.stderr
    assert "Traceback" not in no_cert.stderr


def test_send_command_stores_over_tls_by_destination_name_and_by_address(setup: TlsSetup, tmp_path: Path) -> None:
    """``dicom-node send``: to a configured destination with its TLS files (as the dispatcher), and to
    HOST:PORT with --tls-ca/--tls-cert/--tls-key; the TLS storescp receives both. A certificate from
    another CA and plain TCP to a TLS port fail with a reason and no traceback."""
    def send(path: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "dicom_node", "send", str(path), "--config", str(setup.node.config_path),
                               "--timeout", "10", *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    by_name, by_name_uid = photo_file(tmp_path / "by-name")
    done = send(by_name, "--to", "tlspacs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent 1 of 1" in done.stdout and "over TLS" in done.stdout, done.stdout
    by_address, by_address_uid = photo_file(tmp_path / "by-address")
    client = setup.modality_a
    done = send(by_address, "--to", f"127.0.0.1:{setup.pacs.port}", "--aet", setup.pacs.aet,
                "--tls-ca", str(setup.pki.ca), "--tls-cert", str(client.cert), "--tls-key", str(client.key))
    assert done.returncode == 0, done.stdout + done.stderr
    received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in setup.pacs.files()}
    assert {by_name_uid, by_address_uid} <= received

    refused, _ = photo_file(tmp_path / "refused")
    wrong_ca = send(refused, "--to", "wrongca")
    assert wrong_ca.returncode == 1 and "certificate verify failed" in wrong_ca.stderr, wrong_ca.stderr
    plain = send(refused, "--to", f"127.0.0.1:{setup.pacs.port}", "--aet", setup.pacs.aet)
    assert plain.returncode == 1 and "cannot connect" in plain.stderr, plain.stdout + plain.stderr
    assert "expects DICOM TLS" in plain.stderr, plain.stderr
    for done in (wrong_ca, plain):
        assert "Traceback" not in done.stderr
    usage = send(refused, "--to", f"127.0.0.1:{setup.pacs.port}", "--aet", setup.pacs.aet,
                 "--tls-cert", str(client.cert), "--tls-key", str(client.key))
    assert usage.returncode == 2 and "--tls-cert needs --tls-ca" in usage.stderr


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("case", "reason"), [
    ("no client certificate", "no client certificate"),
    ("certificate from another CA", "certificate verify failed: unable to get local issuer certificate"),
    ("expired certificate", "certificate verify failed: certificate has expired"),
    ("plain TCP", "not a TLS client"),
])
def test_refused_handshakes_are_logged_and_the_node_goes_on(setup: TlsSetup, tmp_path: Path, case: str,
                                                             reason: str) -> None:
    pki = setup.pki
    tls: list[str] | None = {
        "no client certificate": tls_args(None, pki.ca),
        "certificate from another CA": tls_args(pki.leaf("foreign", "modality-a", other_ca=True), pki.ca),
        "expired certificate": tls_args(pki.leaf("expired", "modality-a", expired=True), pki.ca),
        "plain TCP": None,
    }[case]
    path, uid = photo_file(tmp_path)
    refused_before = setup.node.log_text().count("event=intake.tls_refused")
    sent = dcmtk("storescu", setup.tls_port, str(path), tls=tls)
    assert sent.returncode != 0, f"{case}: storescu succeeded"
    line = log_line(setup.node, "event=intake.tls_refused", reason)
    assert "WARNING" in line and "host=127.0.0.1" in line and "Traceback" not in setup.node.log_text()
    assert setup.node.log_text().count("event=intake.tls_refused") > refused_before
    assert uid not in {j.sop_instance_uid for j in setup.node.jobs()}
    assert echo_over_tls(setup).returncode == 0  # the listener still serves
    assert dcmtk("echoscu", setup.node.port).returncode == 0  # and so does the plain one


def test_only_bcp195_suites_and_tls12_or_later_are_negotiated(setup: TlsSetup) -> None:
    def handshake(**options: Any) -> str:
        context = client_context(setup.pki.ca, setup.modality_a.cert, setup.modality_a.key)
        for name, value in options.items():
            if name == "ciphers":
                context.set_ciphers(value)
            else:
                setattr(context, name, value)
        with socket.create_connection(("127.0.0.1", setup.tls_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return f"{tls.version()} {tls.cipher()[0]}"

    assert handshake().startswith("TLSv1.3")
    tls12 = handshake(maximum_version=ssl.TLSVersion.TLSv1_2)
    assert tls12.split()[1] in BCP195_TLS12_CIPHERS.split(":"), tls12
    with pytest.raises(ssl.SSLError):  # CBC with SHA-1 MAC: not in BCP 195
        handshake(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):  # AES-GCM without forward secrecy is not offered either
        handshake(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256:@SECLEVEL=0")


def test_a_silent_connection_does_not_block_the_tls_listener(setup: TlsSetup) -> None:
    with socket.create_connection(("127.0.0.1", setup.tls_port), timeout=10):  # says nothing
        assert echo_over_tls(setup).returncode == 0


def test_a_caller_pinned_to_a_certificate_subject_needs_that_certificate(setup: TlsSetup) -> None:
    other = echo_over_tls(setup, setup.modality_b, calling=PINNED_AET)  # CA-signed, but CN=modality-b
    assert other.returncode != 0
    line = log_line(setup.node, "event=intake.rejected", f"calling_ae={PINNED_AET}",
                    f'certificate_subject="CN=modality-b,O={ORG}"')
    assert "not the one this caller is pinned to" in line
    plain = dcmtk("echoscu", setup.node.port, calling=PINNED_AET)
    assert plain.returncode != 0
    log_line(setup.node, "event=intake.rejected", f"calling_ae={PINNED_AET}", "TLS with a client certificate needed")
    assert echo_over_tls(setup, setup.modality_a, calling=PINNED_AET).returncode == 0  # the pinned subject


# --------------------------------------------------------------------------- certificate reload


def _replace(credential: Credential, new: Credential) -> None:
    """Swap in new certificate files the way renewal tools do (write aside, rename over)."""
    for source, target in ((new.key, credential.key), (new.cert, credential.cert)):
        aside = target.with_suffix(".new")
        shutil.copyfile(source, aside)
        aside.replace(target)


def test_sighup_reloads_the_certificate_for_new_connections_and_keeps_open_associations(
        setup: TlsSetup, tmp_path: Path) -> None:
    pki, node = setup.pki, setup.node
    assert node.process is not None
    old_serial = setup.node_cert.serial
    assert peer_serial(setup.tls_port, pki.ca, setup.modality_a) == old_serial

    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(VLPhotographicImageStorage)
    context = client_context(pki.ca, setup.modality_a.cert, setup.modality_a.key)
    assoc = ae.associate("127.0.0.1", setup.tls_port, ae_title=NODE_AET, tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    try:
        renewed = pki.leaf("node-renewed", "dicom-node")
        _replace(setup.node_cert, renewed)
        node.process.send_signal(signal.SIGHUP)
        log_line(node, "event=intake.tls_reloaded", f"serial={renewed.serial:x}")
        assert peer_serial(setup.tls_port, pki.ca, setup.modality_a) == renewed.serial

        # a broken file at the next reload: the ERROR line, and the renewed certificate stays in use
        setup.node_cert.key.write_text("not a key\n")
        node.process.send_signal(signal.SIGHUP)
        line = log_line(node, "event=intake.tls_reload_failed")
        assert "ERROR" in line and str(setup.node_cert.key) in line
        assert peer_serial(setup.tls_port, pki.ca, setup.modality_a) == renewed.serial
        _replace(setup.node_cert, renewed)

        # the association opened before both reloads still stores
        path, uid = photo_file(tmp_path)
        response = assoc.send_c_store(pydicom.dcmread(path))
        assert int(response.Status) == status.SUCCESS
        assert node.process.poll() is None
    finally:
        if assoc.is_established:
            assoc.release()
    assert uid in {j.sop_instance_uid for j in node.jobs()}


def test_tls_only_listener_in_process(tmp_path: Path) -> None:
    """``plain_listener = false`` on port 0: one TLS port, the node's own SCU echoes over it, and
    :meth:`IntakeSCP.reload_tls` keeps the old context when the new files are bad."""
    pki = Pki(tmp_path / "pki")
    node_cert, caller = pki.leaf("node", "dicom-node"), pki.leaf("caller", "modality-a")
    config = NodeConfig(
        port=free_port(), data_dir=tmp_path / "data",
        callers=[{"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        tls={"enabled": True, "port": 0, "plain_listener": False, "certificate": str(node_cert.cert),
             "private_key": str(node_cert.key), "ca_certificates": str(pki.ca)})
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    scp = IntakeSCP(config.listener, config.intake, config.peers, store, spool, NullMetrics(),
                    new_doorbells().photo_received)
    try:
        scp.start()
        assert scp.listening and scp.tls_port and scp.port == scp.tls_port
        assert len(scp.ae._servers) == 1  # no plain listener
        node = Peer(NODE_AET, "127.0.0.1", scp.tls_port, tls=True, ca_certificates=pki.ca,
                    certificate=caller.cert, private_key=caller.key)
        assert echo(node, SCU_AET, timeout_s=10) == status.SUCCESS
        with pytest.raises(AssociationError, match="certificate verify failed"):  # the node checks the node
            echo(Peer(NODE_AET, "127.0.0.1", scp.tls_port, tls=True, ca_certificates=pki.other_ca,
                      certificate=caller.cert, private_key=caller.key), SCU_AET, timeout_s=10)
        node_cert.cert.write_text("")
        assert scp.reload_tls() is False
        assert echo(node, SCU_AET, timeout_s=10) == status.SUCCESS
    finally:
        scp.stop()
        store.close()
    assert not scp.listening


# --------------------------------------------------------------------------- configuration


def _error(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "node.toml"
    path.write_text(to_toml(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_tls_configuration_is_checked_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("DICOM_NODE_")]:
        monkeypatch.delenv(name)
    dest = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 2762}
    assert "tls.enabled needs tls.certificate and tls.private_key" in _error(tmp_path, {"tls": {"enabled": True}})
    needs_ca = _error(tmp_path, {"tls": {"enabled": True, "certificate": "a.pem", "private_key": "a.key"}})
    assert "tls.require_client_certificate needs tls.ca_certificates" in needs_ca
    assert "tls = true needs ca_certificates" in _error(tmp_path, {"destinations": [{**dest, "tls": True}]})
    assert "certificate and private_key go together" in _error(
        tmp_path, {"destinations": [{**dest, "tls": True, "ca_certificates": "ca.pem", "certificate": "c.pem"}]})
    assert "used only with tls = true" in _error(tmp_path, {"destinations": [{**dest, "ca_certificates": "ca.pem"}]})
    bad_pin = _error(tmp_path, {"callers": [{"ae_title": "A", "certificate_subject": "modality-a"}]})
    assert "callers[0].certificate_subject" in bad_pin and "RFC 4514" in bad_pin
    assert "tls.port" in _error(tmp_path, {"tls": {"port": 70000}})

    config = NodeConfig(tls={"enabled": True, "port": 0, "plain_listener": False, "certificate": "a.pem",
                             "private_key": "a.key", "require_client_certificate": False},
                        callers=[{"ae_title": "A", "certificate_subject": "cn=a,  o=Example\\, Inc"}],
                        destinations=[{**dest, "ae_title": "A"}])
    assert config.listener.tls is not None and not config.listener.plain and config.listener.tls.port == 0
    assert config.callers[0].certificate_subject == "CN=a,O=Example\\, Inc"
    assert canonical_subject("CN=modality-1 + OU=Photo, O=Hospital") == "CN=modality-1+OU=Photo,O=Hospital"


def test_unusable_tls_files_stop_the_node_with_one_message(tmp_path: Path, small_model_dir: Path) -> None:
    pki = Pki(tmp_path / "pki")
    node_cert = pki.leaf("node", "dicom-node")
    config = node_config(tmp_path / "data", small_model_dir, free_port(), free_port(),
                         tls={"enabled": True, "port": 0, "certificate": str(node_cert.cert),
                              "private_key": str(pki.ca), "ca_certificates": str(pki.ca)},
                         worker={"count": 0})
    path = tmp_path / "node.toml"
    path.write_text(to_toml(config))
    done = subprocess.run([PYTHON, "-m", "dicom_node", "serve", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot start the DICOM TLS listener" in done.stderr and str(pki.ca) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
