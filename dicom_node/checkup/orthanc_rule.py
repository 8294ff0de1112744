"""The Orthanc example shipped in ``config/orthanc/``: does it still point at this node?

The Lua rule forwards photos to the ``DicomModalities`` entry it names and refuses to forward what
comes from the node's AE title (the loop guard). Both break silently when the node's AE title or
port changes in ``node.toml`` and not in Orthanc's files: photos go nowhere, or results loop. So
the check reads both files the way Orthanc does and compares them with the node's configuration.

Where: the ``orthanc/`` folder beside the node's configuration file (``config/orthanc`` for the
shipped ``config/node.toml``). An installation without one is not checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC_DIR_NAME = "orthanc"
ORTHANC_CONFIG = "orthanc.json"

_LUA_STRING = r"""\s*=\s*(?:'([^']*)'|"([^"]*)")"""
_NODE_AET = re.compile(r"\bNODE_AET" + _LUA_STRING)
_NODE_MODALITY = re.compile(r"\bNODE_MODALITY" + _LUA_STRING)
_SEND_TO_LITERAL = re.compile(r"""SendToModality\s*\(\s*\w+\s*,\s*(?:'([^']*)'|"([^"]*)")""")


class OrthancRuleError(ValueError):
    """The shipped Orthanc files cannot be read as Orthanc would; the message says which and why."""


@dataclass(frozen=True)
class OrthancRule:
    """What Orthanc will do with a new photo: forward it to ``modality_*``, never from ``guard_aet``."""

    config_path: Path
    lua_path: Path
    orthanc_aet: str
    orthanc_port: int
    modality: str
    modality_aet: str
    modality_host: str
    modality_port: int
    modality_tls: bool
    guard_aet: str | None  # the rule's NODE_AET: what it never forwards from


def orthanc_dir_for(config_path: Path) -> Path:
    return config_path.parent / ORTHANC_DIR_NAME


def _lua_value(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def _find_lua(orthanc_dir: Path, scripts: list[Any]) -> Path:
    """The rule script Orthanc loads: a relative ``LuaScripts`` entry is relative to where Orthanc
    is started, which the shipped README says is the repository root (two levels above this folder)."""
    if not scripts:
        raise OrthancRuleError(f"{orthanc_dir / ORTHANC_CONFIG} loads no Lua script (LuaScripts is empty): "
                               "Orthanc forwards nothing to the node")
    for entry in scripts:
        given = Path(str(entry))
        candidates = [given] if given.is_absolute() else [orthanc_dir.parent.parent / given, Path.cwd() / given,
                                                          orthanc_dir / given.name]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    raise OrthancRuleError(f"none of the LuaScripts of {orthanc_dir / ORTHANC_CONFIG} ({', '.join(map(str, scripts))}) "
                           "exists")


def _modality(entry: Any, name: str, path: Path) -> tuple[str, str, int, bool]:
    """``DicomModalities`` entries are an object (AET, Host, Port, UseDicomTls) or a list [aet, host, port]."""
    try:
        if isinstance(entry, dict):
            return str(entry["AET"]), str(entry["Host"]), int(entry["Port"]), bool(entry.get("UseDicomTls", False))
        if isinstance(entry, list) and len(entry) >= 3:
            return str(entry[0]), str(entry[1]), int(entry[2]), False
    except (KeyError, TypeError, ValueError):
        pass
    raise OrthancRuleError(f"{path}: DicomModalities.{name} has no usable AET, Host and Port")


def read_rule(orthanc_dir: Path) -> OrthancRule:
    """Read ``orthanc.json`` and the Lua rule it loads (raises :class:`OrthancRuleError`)."""
    path = orthanc_dir / ORTHANC_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OrthancRuleError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OrthancRuleError(f"{path} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise OrthancRuleError(f"{path} is not a JSON object")
    lua_path = _find_lua(orthanc_dir, list(config.get("LuaScripts") or []))
    try:
        lua = lua_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OrthancRuleError(f"cannot read {lua_path}: {exc.strerror or exc}") from None
    modality = _lua_value(_NODE_MODALITY, lua) or _lua_value(_SEND_TO_LITERAL, lua)
    if modality is None:
        raise OrthancRuleError(f"{lua_path} names no modality to forward to (NODE_MODALITY or SendToModality)")
    modalities = config.get("DicomModalities") or {}
    if not isinstance(modalities, dict) or modality not in modalities:
        raise OrthancRuleError(f"{lua_path} forwards to the modality {modality!r}, which {path} does not define "
                               "in DicomModalities")
    aet, host, port, tls = _modality(modalities[modality], modality, path)
    return OrthancRule(path, lua_path, str(config.get("DicomAet", "ORTHANC")), int(config.get("DicomPort", 4242)),
                       modality, aet, host, port, tls, _lua_value(_NODE_AET, lua))
