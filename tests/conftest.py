"""Shared fixtures: untrained models in the official layout, made once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.model.untrained import make_test_model_dir

PARITY_DIR = Path(__file__).parent / "data" / "m2fp_parity"
PARITY_IMAGES = {"landscape_1024x768": "input.png", "portrait_480x640": "input_480x640.png"}

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def parity_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-size M2FP with the parity fixture's deterministic weights (about 250 MB, never committed)."""
    return make_test_model_dir(tmp_path_factory.mktemp("m2fp_parity_model"))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model_dir(tmp_path_factory.mktemp("m2fp_small_model"), small=True)


def official_instances(name: str) -> tuple[dict, np.ndarray]:
    """The official pipeline's kept instances and their masks (N, H, W) for one fixture image."""
    meta = json.loads((PARITY_DIR / f"{name}_pipeline_output.json").read_text())
    packed = np.load(PARITY_DIR / f"{name}_pipeline_masks.npz")
    n, h, w = (int(v) for v in packed["shape"])
    masks = np.unpackbits(packed["packed"], axis=1)[:, : h * w].reshape(n, h, w).astype(bool)
    return meta, masks


def official_label_map(name: str) -> np.ndarray:
    """Label map derived from the official instances by our rule: highest-scoring part wins."""
    meta, masks = official_instances(name)
    h, w = meta["mask_shape_hw"]
    label_map = np.zeros((h, w), np.uint8)
    parts = [(s, c, m) for s, c, m in zip(meta["scores"], meta["class_id"], masks, strict=True) if c != 20]
    for _, c, m in sorted(parts, key=lambda t: t[0]):
        label_map[m] = c
    return label_map

# Fixtures of the node tests (Orthanc, the node as a subprocess): defined in tests/node_fixtures.py.
from tests.node_fixtures import node_factory, node_port, orthanc, running_orthanc  # noqa: E402, F401

# Fixtures of the web tests (the API's parser over the tiny model, a job store): tests/web_fixtures.py.
from tests.web_fixtures import job_store, web_parser  # noqa: E402, F401
