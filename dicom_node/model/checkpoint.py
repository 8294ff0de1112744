"""Loading a ModelScope M2FP model directory, strictly.

The official loader logs and skips keys it cannot place and loads with strict=False, so a
wrong configuration silently yields a half-random model. Ours refuses: any missing, unexpected
or mis-shaped key is an error that names the keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dicom_node.model.config import M2FPConfig, ModelConfigError
from dicom_node.model.m2fp import M2FP
from dicom_node.model.names import CONFIG_FILE, UNTRAINED_MARKER, WEIGHTS_FILE

log = logging.getLogger(__name__)

UNTRAINED_CONFIG_KEY = "dicom_node_untrained"


class ModelLoadError(RuntimeError):
    """The model directory cannot give a complete, correctly shaped M2FP."""


@dataclass
class LoadedModel:
    model: M2FP
    config: M2FPConfig
    digest: str  # sha256 of the state-dict tensors in sorted-key order: the model version
    untrained: bool
    model_dir: Path


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's raw bytes in sorted-key order.

    Independent of how the file was pickled, so the same weights always get the same version
    (and it equals the digest the parity fixture publishes for its recipe).
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(state_dict[key].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def is_untrained(model_dir: Path) -> bool:
    if (model_dir / UNTRAINED_MARKER).exists():
        return True
    try:
        cfg = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(cfg.get(UNTRAINED_CONFIG_KEY, False))


def read_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(...)['model']`` (the official layout) or a bare state dict."""
    try:
        obj = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"no weights file {weights_path}") from exc
    except Exception as exc:  # torch raises several types for corrupt or non-tensor pickles
        raise ModelLoadError(f"cannot read weights {weights_path}: {exc}") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{weights_path} holds neither {{'model': state_dict}} nor a state dict")
    return obj


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ModelLoadError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
            problems.append(f"{len(keys)} {name} key(s): {shown}")
    if problems:
        raise ModelLoadError("checkpoint does not match configuration.json: " + "; ".join(problems))


def load_model_dir(model_dir: str | Path) -> LoadedModel:
    """Build M2FP from ``configuration.json`` and load ``pytorch_model.pt`` strictly, in eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    try:
        config = M2FPConfig.from_file(model_dir / CONFIG_FILE)
    except ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from exc
    state_dict = read_state_dict(model_dir / WEIGHTS_FILE)
    model = M2FP(config)
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    untrained = is_untrained(model_dir)
    digest = state_dict_digest(state_dict)
    if untrained:
        log.warning("model %s is UNTRAINED (random weights): its outputs mean nothing", model_dir)
    return LoadedModel(model, config, digest, untrained, model_dir)
