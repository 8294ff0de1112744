"""Print how closely our M2FP matches the official implementation on the parity fixture.

Rebuilds the fixture's deterministic weights (an UNTRAINED model, ~250 MB in a temporary
directory), runs both fixture images and prints the figures the parity tests bound: raw logit
and mask-logit differences, instance sets, scores, mask IoU and label-map agreement.

    .venv/bin/python scripts/parity_report.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.model.checkpoint import load_model_dir  # noqa: E402
from dicom_node.model.postprocess import postprocess  # noqa: E402
from dicom_node.model.preprocess import prepare_image  # noqa: E402
from dicom_node.model.untrained import make_test_model_dir  # noqa: E402
from tests.conftest import PARITY_DIR, PARITY_IMAGES, official_instances, official_label_map  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model_dir(make_test_model_dir(Path(tmp) / "m2fp"))
    print(f"weights digest {loaded.digest}")
    for name, image in sorted(PARITY_IMAGES.items()):
        prepared = prepare_image(np.asarray(Image.open(PARITY_DIR / image).convert("RGB")))
        with torch.inference_mode():
            out = loaded.model(prepared.tensor, with_aux=True)
            post = postprocess(out["pred_logits"][0], out["pred_masks"][0], prepared.padded_hw,
                               prepared.resized_hw, prepared.original_hw, 20)
        raw = np.load(PARITY_DIR / f"{name}_raw_outputs.npz")
        logits, ref_logits = out["pred_logits"][0].numpy(), raw["pred_logits"][0]
        aux = np.abs(out["aux_pred_logits"][0].numpy() - raw["aux_pred_logits"]).max()
        masks_diff = np.abs(out["pred_masks"][0, :16].numpy() - raw["pred_masks_q0_15"].astype(np.float32)).max()
        meta, official_masks = official_instances(name)
        ours = {(i.query_index, i.class_id): i for i in post.parts + post.humans}
        human_masks = {(h.query_index, h.class_id): m for h, m in zip(post.humans, post.human_masks, strict=True)}
        official = {(q, c): k for k, (q, c) in enumerate(zip(meta["query_index"], meta["class_id"], strict=True))}
        ious, score_diffs, pixel_diffs = [], [], []
        for key, k in official.items():
            if key not in ours:
                continue
            mask = human_masks[key] if key in human_masks else post.upsampler.full_mask(key[0])
            ious.append((mask & official_masks[k]).sum() / (mask | official_masks[k]).sum())
            score_diffs.append(abs(ours[key].score - meta["scores"][k]))
            pixel_diffs.append(int((mask ^ official_masks[k]).sum()))
        label_map = official_label_map(name)
        print(f"{name}: logits max|d| {np.abs(logits - ref_logits).max():.2e} "
              f"(rel {np.abs(logits - ref_logits).max() / np.abs(ref_logits).max():.1e}), aux logits {aux:.2e}, "
              f"mask logits q0-15 max|d| {masks_diff:.4f} (fp16 storage), instances {len(ours)} vs {len(official)} "
              f"same set {set(ours) == set(official)}, max score diff {max(score_diffs):.1e}, "
              f"min IoU {min(ious):.5f}, max differing px/mask {max(pixel_diffs)}, "
              f"label map differing px {int((post.label_map != label_map).sum())} of {label_map.size}")


if __name__ == "__main__":
    main()
