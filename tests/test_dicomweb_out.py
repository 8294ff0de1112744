"""DICOMweb out: a destination of ``kind = "dicomweb"`` gets the results by STOW-RS under the same
persisted retries as C-STORE. The server is Orthanc 1.10 with its DICOMweb plugin, a real process;
only the bearer-token check uses a small stdlib HTTP server (Orthanc has no bearer tokens without
its authorization plugin, which Debian does not package)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main as cli_main
from dicom_node.config import ConfigError, Destination, NodeConfig, load_config
from dicom_node.dispatch import stow
from dicom_node.dispatch.dispatcher import Dispatcher
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.job import JobState
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import (
    DicomWebOrthanc,
    NodeProcess,
    free_port,
    node_config,
    storescu,
    to_toml,
    wait_until,
    write_photos,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb
from tests.test_dispatch import OWNER, job_with_results

USER, PASSWORD, PASSWORD_ENV = "node", "dicomweb-test-pw", "TEST_DICOMWEB_PASSWORD"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    """Orthanc with DICOMweb and HTTP basic authentication (one user: the node)."""
    server = DicomWebOrthanc(tmp_path_factory.mktemp("dicomweb-orthanc"), users={USER: PASSWORD}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return PASSWORD


def setup(tmp_path: Path, url: str, **destination: Any) -> tuple[NodeConfig, SqliteJobStore, LocalSpool, Dispatcher]:
    """A dispatcher whose one destination, 'pacs', is the DICOMweb root ``url``."""
    config = NodeConfig(
        node_id="n", data_dir=tmp_path / "data",
        callers=[{"ae_title": "MOD", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "kind": "dicomweb", "url": url, **destination}],
        dispatch={"give_up_after_h": 0, "backoff_initial_s": 0.3, "backoff_max_s": 0.3, "timeout_s": 10.0,
                  "poll_interval_s": 0.05},
    )
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    dispatcher = Dispatcher(config.dispatch, config.peers, config.ae_title, config.node_id, store, spool,
                            NullMetrics(), new_doorbells().results_ready)
    return config, store, spool, dispatcher


def photos(count: int) -> list[Any]:
    """``count`` small objects of one study (stand-ins for a job's SEG, SC and SR)."""
    datasets = [make_vl_photo(synthetic_rgb(32, 48)) for _ in range(count)]
    for ds in datasets[1:]:
        ds.StudyInstanceUID = datasets[0].StudyInstanceUID
    return datasets


BASIC = {"username": USER, "password_env": PASSWORD_ENV}


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("destination", "words"), [
    ({"kind": "dicomweb"}, 'kind = "dicomweb" needs url'),
    ({"kind": "dicomweb", "url": "http://h/dw", "ae_title": "X", "port": 104}, "does not use ae_title, port"),
    ({"url": "http://h/dw"}, 'keys of kind = "dicomweb"'),
    ({"ae_title": "X", "host": "h"}, "missing: port"),
    ({"kind": "dicomweb", "url": "ftp://h/dw"}, "is not an http:// or https:// URL"),
    ({"kind": "dicomweb", "url": "http://u:p@h/dw"}, "must not carry credentials"),
    ({"kind": "dicomweb", "url": "http://h/dw", "password": "x"}, "credentials are never read from the config"),
    ({"kind": "dicomweb", "url": "http://h/dw", "username": "u"}, "username and password_env go together"),
    ({"kind": "dicomweb", "url": "http://h/dw", "token_env": "T", "username": "u", "password_env": "P"},
     "exclude each other"),
    ({"kind": "dicomweb", "url": "http://h/dw", "token_env": "NOT-A-NAME"}, "not an environment variable name"),
    ({"kind": "dicomweb", "url": "http://h/dw", "verify_tls": False}, "only with an https:// url"),
])
def test_each_kind_says_which_keys_it_needs(tmp_path: Path, destination: dict, words: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(to_toml({"destinations": [{"name": "pacs", **destination}]}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "destinations[0]" in str(error.value) and words in str(error.value), str(error.value)


def test_a_dicomweb_destination_loads_and_is_only_named_by_return_to(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(to_toml({
        "callers": [{"ae_title": "PACS", "return_to": "web"}],
        "destinations": [{"name": "web", "kind": "dicomweb", "url": "https://pacs.example:8443/dicom-web/",
                          "token_env": "PACS_TOKEN", "verify_tls": False}]}))
    config = load_config(path)
    web = config.peers.destination("web")
    assert web.url == "https://pacs.example:8443/dicom-web" and web.ae_title is None
    assert config.peers.sender_destination(config.callers[0]) == web
    warnings = stow.start_warnings(web)
    assert any("verify_tls = false" in w for w in warnings) and any("PACS_TOKEN is not set" in w for w in warnings)


# --------------------------------------------------------------------------- against Orthanc


def test_a_node_delivers_seg_sc_and_sr_by_stow_rs(pacs: DicomWebOrthanc, password: str, tmp_path: Path,
                                                  small_model_dir: Path) -> None:
    port = free_port()
    config = node_config(tmp_path / "data", small_model_dir, port, pacs.dicom_port, destinations=[
        {"name": "pacs", "kind": "dicomweb", "url": pacs.dicomweb_url, **BASIC}],
        worker={"count": 1, "torch_threads": 1, "runtime": "eager"})  # no OpenVINO export: a fast start
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        photo = make_vl_photo(synthetic_rgb(96, 144))
        sent = storescu(write_photos([photo], tmp_path / "in"), port)
        assert sent.returncode == 0, sent.stderr
        (job,) = node.wait_jobs_final(1, 60)
        assert job.state == JobState.DONE, job.reason
        assert sorted(r.kind for r in job.results) == ["sc", "seg", "sr"]
        uids = {r.sop_instance_uid for r in job.results}
        assert {uid for _, uid in job.deliveries} == uids
        assert uids <= pacs.sop_instance_uids(), "SEG, SC and SR are in Orthanc with their SOP Instance UIDs"
        assert "event=dispatch.sent" in node.log_text() and PASSWORD not in node.log_text()
    finally:
        node.stop()


def test_an_outage_is_retried_until_orthanc_is_back(tmp_path: Path) -> None:
    orthanc = DicomWebOrthanc(tmp_path / "orthanc")  # configured, not started yet: the URL refuses
    config, store, spool, dispatcher = setup(tmp_path, orthanc.dicomweb_url)
    datasets = photos(3)
    job_id = job_with_results(store, spool, datasets)
    waiting = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    assert waiting.state == JobState.DISPATCHING and waiting.dispatch_attempts == 1
    assert "cannot connect to" in waiting.reason and "next attempt in 0.3 s" in waiting.reason
    orthanc.start()
    try:
        dispatcher.start()
        done = wait_until(lambda: (j := store.get(job_id)).state == JobState.DONE and j, 20, "the retry")
        dispatcher.stop()
        assert done.dispatch_attempts == 1 and len(done.deliveries) == 3
        assert {ds.SOPInstanceUID for ds in datasets} <= orthanc.sop_instance_uids()
    finally:
        dispatcher.stop()
        orthanc.stop()


@pytest.mark.parametrize(("case", "words"), [
    ("wrong password", "HTTP 401 Unauthorized"),
    ("wrong path", "HTTP 404 Not Found: Unknown resource"),
    ("unset variable", f"environment variable {PASSWORD_ENV} (the destination's credential) is not set"),
])
def test_a_4xx_fails_the_job_at_once_with_the_servers_reason_and_jobs_retry_resends(
        pacs: DicomWebOrthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, words: str) -> None:
    url = pacs.dicomweb_url + ("/not-here" if case == "wrong path" else "")
    if case == "unset variable":
        monkeypatch.delenv(PASSWORD_ENV, raising=False)
    else:
        monkeypatch.setenv(PASSWORD_ENV, "wrong" if case == "wrong password" else PASSWORD)
    config, store, spool, dispatcher = setup(tmp_path, url, **BASIC)
    datasets = photos(2)
    job_id = job_with_results(store, spool, datasets)
    failed = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    assert failed.state == JobState.FAILED and failed.not_before is None and failed.dispatch_attempts == 1
    assert words in failed.reason and f"dicom-node jobs retry {job_id}" in failed.reason, failed.reason
    assert not failed.deliveries and not pacs.has_instance(datasets[0].SOPInstanceUID)

    if case == "wrong password":  # the operator fixes the credential and retries: what is missing goes
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
        store.retry(job_id)
        done = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert done.state == JobState.DONE and len(done.deliveries) == 2
        assert {ds.SOPInstanceUID for ds in datasets} <= pacs.sop_instance_uids()


def test_a_partial_failure_is_reported_per_instance_and_the_retry_sends_only_the_missing_one(
        pacs: DicomWebOrthanc, password: str, tmp_path: Path) -> None:
    """Orthanc answers 409 with one instance referenced and one failed (0x0110) when a request to one
    study's resource carries an instance of another study: the second object here."""
    config, store, spool, dispatcher = setup(tmp_path, pacs.dicomweb_url, **BASIC)
    seg, stray, sr = photos(3)
    stray.StudyInstanceUID = make_vl_photo(synthetic_rgb(8, 8)).StudyInstanceUID
    job_id = job_with_results(store, spool, [seg, stray, sr])
    first = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    assert first.state == JobState.DISPATCHING and first.dispatch_attempts == 1
    assert "1 of 3 objects not stored (HTTP 409 Conflict: failure reason 0x0110 (processing failure))" \
        in first.reason, first.reason
    assert {uid for _, uid in first.deliveries} == {seg.SOPInstanceUID, sr.SOPInstanceUID}
    assert pacs.has_instance(sr.SOPInstanceUID) and not pacs.has_instance(stray.SOPInstanceUID)

    time.sleep(0.3)  # the backoff
    second = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
    assert second.state == JobState.DONE, second.reason  # alone, it goes to its own study's resource
    assert pacs.has_instance(stray.SOPInstanceUID) and store.get(job_id).dispatch_attempts == 1


def test_echo_command_asks_qido_rs(pacs: DicomWebOrthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text(to_toml({"destinations": [{"name": "web", "kind": "dicomweb", "url": pacs.dicomweb_url,
                                               **BASIC}]}))
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    assert cli_main(["echo", "web", "--config", str(path)]) == 0
    assert f"DICOMweb echo (QIDO-RS) to web ({pacs.dicomweb_url}): HTTP 200 OK" in capsys.readouterr().out
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert cli_main(["echo", "web", "--config", str(path)]) == 1
    assert "failed: HTTP 401 Unauthorized" in capsys.readouterr().err


def test_https_is_verified_by_default(tmp_path: Path) -> None:
    """The HTTPS server is OpenSSL's own (``openssl s_server -www`` answers every GET with 200):
    Orthanc 1.10.1's HTTPS (SslEnabled) segfaults on its first request on this Debian 12."""
    from tests.test_tls import Pki

    pki = Pki(tmp_path / "pki")
    server = pki.leaf("server", "127.0.0.1")
    port = free_port()
    process = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert", str(server.cert), "-key",
                                str(server.key), "-www", "-quiet"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        url = f"https://127.0.0.1:{port}/dicom-web"

        def destination(**keys: Any) -> Destination:
            config = NodeConfig(destinations=[{"name": "p", "kind": "dicomweb", "url": url, **keys}])
            return config.peers.destination("p")

        trusted = destination(ca_certificates=str(pki.ca))
        assert wait_until(lambda: stow.echo(trusted).reachable, 10, "openssl s_server")
        with pytest.raises(stow.StowError, match="certificate verify failed") as error:
            stow.echo(destination())  # the system's CAs do not know the test CA
        assert not error.value.permanent, "a certificate problem is retried, like a DICOM TLS association's"
        with pytest.raises(stow.StowError, match="certificate verify failed"):
            stow.echo(destination(ca_certificates=str(pki.other_ca)))
        assert stow.echo(destination(verify_tls=False)).reachable
    finally:
        process.terminate()
        process.wait(timeout=10)


# --------------------------------------------------------------------------- bearer tokens, 202 and 503


class _Recorder(BaseHTTPRequestHandler):
    """Answers each POST with the next queued (status, DICOM JSON) and records its headers and body."""

    answers: list[tuple[int, dict]] = []
    requests: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append((self.path, dict(self.headers), body))
        code, document = type(self).answers.pop(0)
        data = json.dumps(document).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _referenced(uid: str, warning: int | None = None) -> dict:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def test_bearer_token_503_and_a_202_with_warnings_and_failures(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TEST_TOKEN", "token-123")
        url = f"http://127.0.0.1:{server.server_address[1]}/dw"
        config, store, spool, dispatcher = setup(tmp_path, url, token_env="TEST_TOKEN")
        seg, sc, sr = photos(3)
        job_with_results(store, spool, [seg, sc, sr])
        _Recorder.answers = [(503, {})]
        busy = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert busy.state == JobState.DISPATCHING and "HTTP 503 Service Unavailable" in busy.reason

        _Recorder.answers = [
            (202, {"00081199": {"vr": "SQ", "Value": [_referenced(seg.SOPInstanceUID, 0xB000)]},
                   "00081198": {"vr": "SQ", "Value": [{**_referenced(sc.SOPInstanceUID),
                                                       "00081197": {"vr": "US", "Value": [0xA700]}}]}}),
            (200, {"00081199": {"vr": "SQ", "Value": [_referenced(sr.SOPInstanceUID)]}}),
        ]
        time.sleep(0.3)
        partial = dispatcher.dispatch(store.claim_for_dispatch(OWNER, 60), OWNER)
        assert "HTTP 202 Accepted: failure reason 0xA700 (out of resources)" in partial.reason, partial.reason
        assert {uid for _, uid in partial.deliveries} == {seg.SOPInstanceUID, sr.SOPInstanceUID}
        path, headers, body = _Recorder.requests[-2]
        assert headers["Authorization"] == "Bearer token-123" and path == f"/dw/studies/{seg.StudyInstanceUID}"
        assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
        assert body.count(b"Content-Type: application/dicom\r\n") == 2, "SEG and SC in one request, the SR after"
    finally:
        server.shutdown()
