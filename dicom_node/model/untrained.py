"""Untrained M2FP model directories in the official layout, for tests and benchmarks.

The real weights cannot be bundled (CC BY-NC 4.0) nor downloaded in every environment, so
tests and benchmarks run on deterministic random weights with the official architecture.
The weights follow the parity fixture's recipe (seeded per key, with gains that keep the
100 queries diverse); the directory is marked untrained so nothing passes it off as a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dicom_node.model.checkpoint import UNTRAINED_CONFIG_KEY
from dicom_node.model.config import M2FPConfig
from dicom_node.model.m2fp import M2FP
from dicom_node.model.names import CONFIG_FILE, UNTRAINED_MARKER, WEIGHTS_FILE

SEED, GAIN, MASK_GAIN, QUERY_GAIN, RESID_GAIN = 1234, 100.0, 1.0, 16.0, 0.25
_P = "sem_seg_head.predictor."

DEFAULT_CONFIG = Path(__file__).with_name("configuration.json")

# A tiny model of the same architecture: seconds to build and run, for fast tests.
SMALL_OVERRIDES = {
    "backbone": {"depth": 50, "stem_out_channels": 32, "res2_out_channels": 64, "width_per_group": 16},
    "encoder": {"conv_dim": 64, "mask_dim": 64, "transformer_nheads": 4, "transformer_dim_feedforward": 128,
                "transformer_enc_layers": 2},
    "decoder": {"hidden_dim": 64, "num_queries": 30, "nheads": 4, "dim_feedforward": 128, "dec_layers": 3,
                "mask_dim": 64},
}

MARKER_TEXT = (
    "UNTRAINED MODEL: random weights in the official M2FP layout, made by `dicom-node model make-test`.\n"
    "Its parsings are meaningless. It exists to test and benchmark the software.\n"
    "Get the real weights with `dicom-node model fetch` (see README).\n"
)


def recipe_tensor(key: str, index: int, shape: tuple[int, ...], seed: int = SEED, gain: float = GAIN,
                  mask_gain: float = MASK_GAIN, query_gain: float = QUERY_GAIN,
                  resid_gain: float = RESID_GAIN) -> torch.Tensor:
    """The parity fixture's deterministic value for key number ``index`` (sorted-key order)."""
    rng = np.random.default_rng([seed, index])
    if key.endswith("running_mean"):
        a = np.zeros(shape)
    elif key.endswith("running_var"):
        a = np.ones(shape)
    elif key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.int64)
    elif len(shape) == 1 and key.endswith(".weight"):
        a = np.ones(shape)
    elif key.endswith(".bias"):
        a = rng.uniform(-0.05, 0.05, size=shape)
    elif len(shape) >= 2:
        bound = np.sqrt(3.0 / np.prod(shape[1:]))
        a = rng.uniform(-bound, bound, size=shape)
    else:
        a = rng.uniform(-0.05, 0.05, size=shape)
    if key == _P + "class_embed.weight":
        a = a * gain
    if key in (_P + "mask_embed.layers.2.weight", _P + "mask_embed.layers.2.bias"):
        a = a * mask_gain
    if key in (_P + "query_feat.weight", _P + "query_embed.weight"):
        a = a * query_gain
    if key.startswith(_P + "transformer_") and key.endswith(("out_proj.weight", "linear2.weight")):
        a = a * resid_gain
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def recipe_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, torch.Tensor]:
    return {k: recipe_tensor(k, i, shapes[k], seed=seed) for i, k in enumerate(sorted(shapes))}


def small_config_dict() -> dict:
    cfg = json.loads(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    for section, values in SMALL_OVERRIDES.items():
        cfg["model"][section].update(values)
    # Small inputs too (the official pipeline always scales the shorter side to 640).
    cfg["model"]["input_min_size"] = 256
    cfg["model"]["input_max_size"] = 512
    return cfg


def make_test_model_dir(out_dir: str | Path, small: bool = False, seed: int = SEED) -> Path:
    """Write configuration.json, pytorch_model.pt ({'model': state_dict}) and the UNTRAINED marker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = small_config_dict() if small else json.loads(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    cfg[UNTRAINED_CONFIG_KEY] = True
    model = M2FP(M2FPConfig.from_dict(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict = recipe_state_dict(shapes, seed=seed)
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    torch.save({"model": state_dict}, tmp)
    tmp.replace(out_dir / WEIGHTS_FILE)
    (out_dir / UNTRAINED_MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    return out_dir
