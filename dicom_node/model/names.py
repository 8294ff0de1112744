"""The model side's names that others need without importing torch: where a model lives, the
files of a ModelScope model directory, and the postprocess modes.

The configuration, the CLI's help and the node's start-up check read these; importing
:mod:`dicom_node.model.checkpoint` for them would load torch (seconds) in every ``dicom-node``
command.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

MODEL_DIR_ENV = "DICOM_NODE_MODEL_DIR"
# Where the node and the CLI look for the model unless told otherwise.
DEFAULT_MODEL_DIR = Path("models/m2fp")

# A ModelScope M2FP directory (as `modelscope download` writes it).
CONFIG_FILE = "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"
UNTRAINED_MARKER = "UNTRAINED.txt"  # written by `dicom-node model make-test` beside random weights
# Written by `dicom-node model fetch` after the strict load: where the weights came from (hub, model
# id, revision), the sha256 of pytorch_model.pt and the state-dict digest (the model version).
MODEL_RECORD_FILE = "dicom_node-model.json"


class PostprocessMode(StrEnum):
    """How the network's masks become the label map (:mod:`dicom_node.model.postprocess`)."""

    EXACT = "exact"  # the official semantics, at the photo's size
    FAST = "fast"  # scores and label map at the network-input size (~35x faster on 12 MP photos)


def default_model_dir() -> Path:
    """``$DICOM_NODE_MODEL_DIR``, else :data:`DEFAULT_MODEL_DIR` (the CLI's default)."""
    return Path(os.environ.get(MODEL_DIR_ENV, DEFAULT_MODEL_DIR))


def model_present(model_dir: Path) -> bool:
    """Both files of a model directory are there (whether they load is the loader's question)."""
    return (model_dir / CONFIG_FILE).is_file() and (model_dir / WEIGHTS_FILE).is_file()
