"""The strict loader: a checkpoint that does not fit the configuration is refused, naming the keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dicom_node.model.checkpoint import (
    CONFIG_FILE,
    UNTRAINED_MARKER,
    WEIGHTS_FILE,
    ModelLoadError,
    load_model_dir,
    state_dict_digest,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(model_dir: Path, edit) -> None:
    sd = torch.load(model_dir / WEIGHTS_FILE, weights_only=True)["model"]
    edit(sd)
    torch.save({"model": sd}, model_dir / WEIGHTS_FILE)


def test_loads_official_layout_and_marks_untrained(small_model_dir: Path) -> None:
    loaded = load_model_dir(small_model_dir)
    assert loaded.untrained
    assert not loaded.model.training
    sd = torch.load(small_model_dir / WEIGHTS_FILE, weights_only=True)["model"]
    assert loaded.digest == state_dict_digest(sd)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_bare_state_dict_is_accepted(small_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    sd = torch.load(d / WEIGHTS_FILE, weights_only=True)["model"]
    torch.save(sd, d / WEIGHTS_FILE)
    assert load_model_dir(d).digest == load_model_dir(small_model_dir).digest


def test_missing_key_is_named(small_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.pop("sem_seg_head.predictor.class_embed.bias"))
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\): sem_seg_head.predictor.class_embed.bias"):
        load_model_dir(d)


def test_unexpected_key_is_named(small_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.__setitem__("sem_seg_head.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"unexpected key\(s\): sem_seg_head.extra.weight"):
        load_model_dir(d)


def test_misshaped_key_is_named(small_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.__setitem__("sem_seg_head.predictor.query_feat.weight", torch.zeros(7, 64)))
    with pytest.raises(ModelLoadError, match=r"mis-shaped key\(s\): sem_seg_head.predictor.query_feat.weight"):
        load_model_dir(d)


def test_wrong_configuration_is_refused_not_half_loaded(small_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg["model"]["decoder"]["dec_layers"] = 4  # one layer more than the weights hold
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing key"):
        load_model_dir(d)


def test_marker_removed_means_not_untrained(small_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    (d / UNTRAINED_MARKER).unlink()
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg.pop("dicom_node_untrained")
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    assert not load_model_dir(d).untrained


@pytest.mark.parametrize("damage", ["no_weights", "garbage_weights", "no_config", "bad_json"])
def test_unusable_directories_give_model_load_error(small_model_dir: Path, tmp_path: Path, damage: str) -> None:
    d = _copy(small_model_dir, tmp_path / "m")
    if damage == "no_weights":
        (d / WEIGHTS_FILE).unlink()
    elif damage == "garbage_weights":
        (d / WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    elif damage == "no_config":
        (d / CONFIG_FILE).unlink()
    else:
        (d / CONFIG_FILE).write_text("{")
    with pytest.raises(ModelLoadError):
        load_model_dir(d)


def test_inference_imports_no_modelscope_torchvision_mmcv_or_timm(small_model_dir: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from dicom_node.parse.engine import HumanParser\n"
        f"p = HumanParser.from_model_dir({str(small_model_dir)!r})\n"
        "p.parse(np.zeros((64, 48, 3), np.uint8))\n"
        "bad = [m for m in ('modelscope', 'torchvision', 'mmcv', 'timm') if m in sys.modules]\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout
