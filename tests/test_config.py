"""The node configuration: TOML + DICOM_NODE_* environment, validated with errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import VLPhotographicImageStorage as VL_PHOTOGRAPHIC_IMAGE_STORAGE

from dicom_node.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    NodeConfig,
    load_config,
)
from tests.node_fixtures import REPO, to_toml

BASE = {
    "callers": [{"ae_title": "PACS1", "host": "10.0.0.5", "return_to": "pacs"}],
    "destinations": [{"name": "pacs", "ae_title": "PACS1", "host": "10.0.0.5", "port": 104}],
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DICOM_NODE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(data if isinstance(data, str) else to_toml(data))
    return path


def error_of(tmp_path: Path, data: dict | str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    return str(info.value)


def test_defaults_are_safe_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/node.toml here: defaults only
    config = load_config()
    assert config.bind_address == "127.0.0.1"
    # VL Photographic and Dermoscopic Photography (PS3.4 B.5: 1.2.840.10008.5.1.4.1.1.77.1.7)
    assert config.intake.accepted_sop_classes == [VL_PHOTOGRAPHIC_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.77.1.7"]
    assert "1.2.840.10008.1.2.4.50" in config.intake.accepted_transfer_syntaxes  # JPEG Baseline
    assert config.callers == []  # nobody may send until configured
    assert config.job_db_path == Path("data") / "jobs.sqlite3"


@pytest.mark.parametrize("name", ["node.toml", "node.example.toml"])
def test_shipped_configurations_load(name: str) -> None:
    config = load_config(REPO / "config" / name)
    assert config.peers.destination("pacs").ae_title == "ORTHANC"
    caller = config.peers.caller("ORTHANC", "127.0.0.1")
    assert caller is not None and config.peers.sender_destination(caller).name == "pacs"
    assert config.peers.caller("ORTHANC", "10.9.9.9") is None  # pinned to its host


def test_default_path_is_config_node_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert DEFAULT_CONFIG_PATH == Path("config/node.toml")
    assert load_config().port == 11112


def test_environment_overrides_the_file_nested_with_double_underscore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, {**BASE, "port": 1000, "dispatch": {"max_attempts": 3, "backoff_initial_s": 1.0}})
    monkeypatch.setenv("DICOM_NODE_PORT", "2000")
    monkeypatch.setenv("DICOM_NODE_DISPATCH__MAX_ATTEMPTS", "7")
    monkeypatch.setenv("DICOM_NODE_DESTINATIONS",
                       '[{"name": "pacs", "ae_title": "PACS1", "host": "10.0.0.6", "port": 11112}]')
    config = load_config(path)
    assert config.port == 2000
    assert config.dispatch.max_attempts == 7
    assert config.dispatch.backoff_initial_s == 1.0  # the rest of the table stays from the file
    assert config.peers.destination("pacs").host == "10.0.0.6"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(write(tmp_path, {**BASE, "port": 3333})))
    assert load_config().port == 3333


def test_transfer_syntax_and_sop_class_names_become_uids(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {**BASE, "intake": {
        "accepted_transfer_syntaxes": ["JPEGBaseline8Bit", "1.2.840.10008.1.2.1"],
        "accepted_sop_classes": ["VLPhotographicImageStorage", "1.2.840.10008.5.1.4.1.1.7"]}}))
    assert config.intake.accepted_transfer_syntaxes == ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"]
    assert config.intake.accepted_sop_classes == [VL_PHOTOGRAPHIC_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.7"]


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"prot": 104}, "prot", "unknown key"),
        ({"dispatch": {"max_atempts": 3}}, "dispatch.max_atempts", "unknown key"),
        ({"port": 70000}, "port", "65535"),
        ({"ae_title": "A_VERY_LONG_AE_TITLE"}, "ae_title", "16"),
        ({"destinations": [{"name": "x", "ae_title": "X", "host": "h", "port": 0}]}, "destinations[0].port", ""),
        ({"intake": {"accepted_sop_classes": ["1.2.840.10008.5.1.4.1.1.2"]}}, "intake.accepted_sop_classes",
         "cannot be decoded"),
        ({"intake": {"accepted_transfer_syntaxes": ["MPEG2MPML"]}}, "intake.accepted_transfer_syntaxes",
         "not one the photo decoder reads"),
        ({"routing": {"rules": [{"name": "r", "send_to": ["nowhere"]}]}}, "routing.rules[0].send_to[0]",
         "no destination is named 'nowhere'"),
        ({"routing": {"rules": [{"name": "r", "match": {"Modalty": ["XC"]}}]}}, "routing.rules[0].match",
         "not a DICOM keyword"),
        ({"worker": {"count": -1}}, "worker.count", "greater than or equal to 0"),
        ({"log_level": "LOUD"}, "log_level", "LOUD"),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, data: dict, key: str, words: str) -> None:
    message = error_of(tmp_path, {**BASE, **data})
    assert f"\n  {key}" in message, message
    assert words in message


def test_sender_without_a_destination_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"callers": [{"ae_title": "MODALITY"}], "destinations": []})
    assert "callers[0] (MODALITY)" in message and "return_to" in message


def test_unknown_return_to_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, {**BASE, "callers": [{"ae_title": "PACS1", "return_to": "archive"}]})
    assert "callers[0].return_to: no destination is named 'archive'" in message


def test_environment_errors_name_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_WORKER__COUNT", "many")
    message = error_of(tmp_path, BASE)
    assert "worker.count (set by DICOM_NODE_WORKER__COUNT)" in message


def test_missing_explicit_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    message = error_of(tmp_path, "port = = 3\n")
    assert "not valid TOML" in message


def test_serve_with_a_bad_key_stops_before_anything_starts(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "dispatch": {"backoff_max_s": -5}})
    done = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert "dispatch.backoff_max_s" in done.stderr and "greater than 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_is_frozen() -> None:
    config = NodeConfig()
    with pytest.raises(Exception):  # noqa: B017  (pydantic's ValidationError for frozen models)
        config.port = 1  # type: ignore[misc]


def test_result_series_numbers_and_descriptions_reach_the_encoder(tmp_path) -> None:
    from dicom_node.config import load_config

    path = tmp_path / "node.toml"
    path.write_text(
        (REPO / "config" / "node.toml").read_text()
        + '\n[results]\nseg_series_number = 42\nsr_series_description = "Burn area report"\n'
    )
    options = load_config(path).results.encode_options()
    assert options.seg_series_number == 42
    assert options.sr_series_description == "Burn area report"
    assert options.sc_series_number == 9102  # the default stays


def test_callers_are_pinned_by_address_or_network_never_by_host_name(tmp_path: Path) -> None:
    data = {**BASE, "callers": [{"ae_title": "PACS1", "host": "pacs.example.org", "return_to": "pacs"}]}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    assert "callers[0].host" in str(err.value) and "not an IP address or network" in str(err.value)

    data = {**BASE, "callers": [{"ae_title": "PACS1", "host": "10.1.2.0/24", "return_to": "pacs"},
                                {"ae_title": "CAM", "host": "10.0.0.7", "return_to": "pacs"}]}
    peers = load_config(write(tmp_path, data)).peers
    assert peers.caller("PACS1", "10.1.2.77") is not None
    assert peers.caller("PACS1", "10.1.3.1") is None
    assert peers.caller("CAM", "10.0.0.7") is not None
    assert peers.caller("CAM", "::ffff:10.0.0.7") is not None, "an IPv4-mapped IPv6 peer is the same host"
    assert peers.caller("CAM", "10.0.0.8") is None


def test_caller_pinned_to_a_certificate_subject_needs_that_subject(tmp_path: Path) -> None:
    data = {**BASE, "callers": [{"ae_title": "PACS1", "certificate_subject": "CN=pacs-1,O=Hospital",
                                 "return_to": "pacs"}]}
    peers = load_config(write(tmp_path, data)).peers
    assert peers.caller("PACS1", "10.0.0.5", "CN=pacs-1,O=Hospital") is not None
    assert peers.caller("PACS1", "10.0.0.5", "CN=pacs-2,O=Hospital") is None
    assert peers.caller("PACS1", "10.0.0.5", None) is None, "plain TCP has no certificate"


def test_dispatch_retries_for_a_day_by_default() -> None:
    """The retry horizon outlasts a maintenance window: give up only after 24 h and the attempts."""
    config = NodeConfig(**BASE)
    assert config.dispatch.give_up_after_h >= 24.0
