"""Downloading the official M2FP weights from ModelScope (the optional ``fetch`` extra).

modelscope is imported here only, never at inference time: its own M2FP code pulls in
torchvision, timm and mmcv, none of which we need.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dicom_node.model.checkpoint import ModelLoadError, load_model_dir
from dicom_node.model.names import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

MODEL_ID = "damo/cv_resnet101_image-multiple-human-parsing"
LICENCE_NOTE = (
    "The M2FP weights are licensed CC BY-NC 4.0 (non-commercial use only) by their authors; "
    "dicom_node does not bundle them."
)


class FetchError(RuntimeError):
    """The weights could not be downloaded or are not a usable M2FP model directory."""


def fetch_model(target_dir: str | Path, model_id: str = MODEL_ID, revision: str | None = None) -> Path:
    """Download the model directory into ``target_dir``, then prove it loads strictly."""
    target_dir = Path(target_dir)
    try:
        from modelscope.hub.snapshot_download import snapshot_download  # noqa: PLC0415 (optional extra)
    except ImportError as exc:
        raise FetchError(
            "modelscope is not installed: run `.venv/bin/pip install '.[fetch]'` (it is only needed to download "
            "the weights), or copy configuration.json and pytorch_model.pt of "
            f"{model_id} into {target_dir} by hand"
        ) from exc
    cache = target_dir.parent / (target_dir.name + ".download")
    try:
        downloaded = Path(snapshot_download(model_id, revision=revision, cache_dir=str(cache)))
    except Exception as exc:  # modelscope raises requests/HTTP/its own errors; all mean "not reachable"
        raise FetchError(
            f"cannot download {model_id} from the ModelScope hub ({type(exc).__name__}: {exc}). "
            "Is the hub reachable from this machine? Offline, fetch it elsewhere with "
            f"`modelscope download --model {model_id} --local_dir DIR` and copy DIR to {target_dir}. "
            "For tests only: `dicom-node model make-test --dir DIR` writes an UNTRAINED model."
        ) from exc
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (downloaded / name).is_file():
            present = sorted(p.name for p in downloaded.iterdir())
            raise FetchError(f"the download of {model_id} lacks {name} (it holds: {present})")
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        tmp = target_dir / (name + ".tmp")
        shutil.copyfile(downloaded / name, tmp)
        tmp.replace(target_dir / name)
    try:
        loaded = load_model_dir(target_dir)
    except ModelLoadError as exc:
        raise FetchError(f"downloaded {model_id} but it does not load: {exc}") from exc
    log.info("fetched %s into %s, version %s. %s", model_id, target_dir, loaded.digest[:16], LICENCE_NOTE)
    return target_dir
