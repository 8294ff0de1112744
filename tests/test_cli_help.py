"""The command line explains itself: every option and positional of every sub-command has a help
text, a mistyped log level is refused by argparse (not silently turned into INFO), and
``--version`` names the version pip installed."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.cli import build_parser
from dicom_node.config import ConfigError, load_config
from dicom_node.logs import LOG_FORMATS, LOG_LEVELS
from tests.node_fixtures import REPO

ENTRY_POINT = Path(sys.executable).parent / "dicom-node"  # the console script pip installed


def dicom_node(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(ENTRY_POINT)] if ENTRY_POINT.is_file() else [sys.executable, "-m", "dicom_node"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def parsers(parser: argparse.ArgumentParser, path: str = "dicom-node") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser and every sub-command's parser, however deep (``dicom-node jobs purge``)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def test_every_option_and_positional_of_every_command_says_what_it_does() -> None:
    missing = []
    seen = 0
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            seen += 1
            text = action.help
            if text is None or text == argparse.SUPPRESS or not text.strip():
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert seen > 40, "the walk found too few arguments: build_parser() changed shape?"
    assert missing == [], "arguments without help: " + ", ".join(missing)


def test_help_of_every_command_renders() -> None:
    """%-placeholders in help texts (%(default)s) are expanded when help is printed: a bad one fails here."""
    for _path, parser in parsers(build_parser()):
        assert parser.format_help()


def test_an_unknown_log_level_is_an_argparse_error_naming_the_levels() -> None:
    done = dicom_node("--log-level", "LOUD", "jobs", "list")
    assert done.returncode == 2, done.stderr
    assert "--log-level" in done.stderr and "'LOUD'" in done.stderr
    for level in LOG_LEVELS:
        assert level in done.stderr, f"{level} not named in: {done.stderr}"
    done = dicom_node("--log-format", "xml", "jobs", "list")
    assert done.returncode == 2 and all(name in done.stderr for name in LOG_FORMATS), done.stderr


def test_log_level_and_format_are_case_insensitive() -> None:
    args = build_parser().parse_args(["--log-level", "debug", "--log-format", "JSON", "jobs", "list"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    args = build_parser().parse_args(["jobs", "list"])
    assert (args.log_level, args.log_format) == (None, None)  # the configuration's then


def test_the_configuration_refuses_an_unknown_log_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/node.toml: defaults and environment only
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    monkeypatch.setenv("DICOM_NODE_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as err:
        load_config()
    assert "log_level" in str(err.value) and "LOUD" in str(err.value)
    monkeypatch.setenv("DICOM_NODE_LOG_LEVEL", "warning")
    assert load_config().log_level == "WARNING"


def test_version_is_the_installed_packages() -> None:
    done = dicom_node("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dicom-node {importlib.metadata.version('dicom-node')}"
