"""Benchmark: the exact postprocess (official semantics at the photo's size), old vs new, bit for bit.

OLD is a verbatim copy of ``dicom_node.model.postprocess.postprocess`` as it was before issue 17
(F.interpolate's generic bilinear kernel for the photo-size logits, compare-and-paint label map);
NEW is the package's current ``postprocess`` (with the fused window kernel where a C compiler
is present; also timed without it, its ATen path). Both run on the same network outputs, interleaved,
in one process with 2 threads (the engine's allocator setting), medians of --runs runs after a
warm-up each; every output is compared bit for bit: kept instances (scores as float64 equality),
human masks, the label map and every part's photo-size mask (``full_mask``).

Inputs: the full-size UNTRAINED model (random weights, official architecture) run once on the
synthetic photo at each size, saved to --inputs (reused when it exists); --synthetic uses random
smooth logits of the same shapes instead (no model needed).

    .venv/bin/python scripts/bench_postprocess.py [--runs 5] [--sizes 1024x768,4000x3000]
        [--inputs /tmp/dicom-node-bench-postprocess.pt] [--synthetic] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.model import window_kernel  # noqa: E402
from dicom_node.model.postprocess import (  # noqa: E402
    RESIZED_CHUNK,
    SCORE_CUT,
    Candidate,
    KeptInstance,
    PostprocessOutput,
    native_is_exact,
    postprocess,
    select_candidates,
)

# ---------------------------------------------------------------------------------------------
# OLD: the exact postprocess before issue 17, copied verbatim (names prefixed Old/old_).
# ---------------------------------------------------------------------------------------------


def _passes(candidates: list[Candidate], human_class: int) -> Iterator[tuple[bool, dict[int, list[Candidate]]]]:
    for is_human_pass in (True, False):
        by_query: dict[int, list[Candidate]] = {}
        for cand in candidates:
            if (cand.class_id == human_class) == is_human_pass:
                by_query.setdefault(cand.query_index, []).append(cand)
        yield is_human_pass, by_query


def _source_index(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear (align_corners=False) source indices and weights along one axis."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    lam = (src - i0.float()).clamp_(0, 1)
    return i0, i1, lam


class OldMaskUpsampler:
    """Stride-4 mask logits -> padded input size -> crop -> photo size, the official chain.

    Both steps are F.interpolate (bilinear, align_corners=False), so the photo-size logits are
    bit-identical to the official ones; only the statistics are restricted to a window.
    """

    def __init__(self, pred_masks: torch.Tensor, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
                 original_hw: tuple[int, int]) -> None:
        self.pred_masks = pred_masks.float()
        self.padded_hw, self.resized_hw, self.original_hw = padded_hw, resized_hw, original_hw
        self._y = _source_index(original_hw[0], resized_hw[0])
        self._x = _source_index(original_hw[1], resized_hw[1])

    def resized(self, queries: list[int]) -> torch.Tensor:
        """(k, h, w) logits at the network-input (resized photo) size."""
        x = F.interpolate(self.pred_masks[queries][None], size=self.padded_hw, mode="bilinear", align_corners=False)
        return x[0, :, : self.resized_hw[0], : self.resized_hw[1]]

    def photo_size(self, resized: torch.Tensor) -> torch.Tensor:
        """(k, H, W) logits at the photo's size."""
        return F.interpolate(resized[None], size=self.original_hw, mode="bilinear", align_corners=False)[0]

    def window_logits(self, resized: torch.Tensor, window: tuple[slice, slice]) -> torch.Tensor:
        """One query's photo-size logits inside ``window``, equal to :meth:`photo_size`'s there.

        ``resized`` is the query's (h, w) logits at the network-input size. PyTorch's bilinear
        kernel interpolates along the width, then combines two such rows along the height, so a
        width-only resize followed by a height-only resize gives the same bits
        (tests/test_postprocess.py checks it). The width pass runs only on the source rows the
        window reads and the height pass only on the window's columns: a small part on a 12 MP
        photo costs a fraction of the photo.
        """
        rows, cols = window
        y0, y1, _ = self._y
        src_top, src_bottom = int(y0[rows.start]), int(y1[rows.stop - 1]) + 1
        n_cols = cols.stop - cols.start
        # The height pass maps output rows onto the whole source height; rows the window never
        # reads stay zero (not garbage: a zero weight times NaN would still be NaN).
        columns = resized.new_zeros((1, 1, self.resized_hw[0], n_cols))
        columns[0, 0, src_top:src_bottom] = F.interpolate(
            resized[None, None, src_top:src_bottom], size=(src_bottom - src_top, self.original_hw[1]),
            mode="bilinear", align_corners=False)[0, 0, :, cols]
        out = F.interpolate(columns, size=(self.original_hw[0], n_cols), mode="bilinear", align_corners=False)
        return out[0, 0, rows]

    def window(self, pos: torch.Tensor) -> tuple[slice, slice] | None:
        """The photo-size box outside which a query's logits cannot be positive; None if nowhere.

        ``pos`` is the query's ``logits > 0`` at the network-input size.
        """
        rows = torch.nonzero(pos.any(1)).flatten()
        if rows.numel() == 0:
            return None
        cols = torch.nonzero(pos.any(0)).flatten()
        (y0, y1, _), (x0, x1, _) = self._y, self._x
        r_lo, r_hi, c_lo, c_hi = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        # photo rows/columns that read a source row/column inside the positive box
        ys = torch.nonzero((y1 >= r_lo) & (y0 <= r_hi)).flatten()
        xs = torch.nonzero((x1 >= c_lo) & (x0 <= c_hi)).flatten()
        if ys.numel() == 0 or xs.numel() == 0:
            return None  # shrinking to a small photo skips every source row/column that is positive
        return slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)

    def full_mask(self, query: int) -> np.ndarray:
        return (self.photo_size(self.resized([query]))[0] > 0).numpy()



def old_postprocess(pred_logits: torch.Tensor, pred_masks: torch.Tensor, padded_hw: tuple[int, int],
                resized_hw: tuple[int, int], original_hw: tuple[int, int], human_class: int) -> PostprocessOutput:
    """Kept parts (score >= 0.1) and humans (score > 0.1), the label map and the human masks.

    pred_logits (Q, K+1) and pred_masks (Q, h, w) for one image. Each label-map pixel takes the
    class of the highest-scoring kept part whose mask covers it, 0 where none does.
    """
    candidates = select_candidates(pred_logits, human_class)
    up = OldMaskUpsampler(pred_masks, padded_hw, resized_hw, original_hw)
    label_map = torch.zeros(original_hw, dtype=torch.uint8)
    best = torch.zeros(original_hw, dtype=torch.float32)
    humans: list[KeptInstance] = []
    human_masks: list[np.ndarray] = []
    human_resized: list[torch.Tensor] = []
    parts: list[KeptInstance] = []
    for is_human_pass, by_query in _passes(candidates, human_class):
        queries = list(by_query)
        for start in range(0, len(queries), RESIZED_CHUNK):
            chunk = queries[start:start + RESIZED_CHUNK]
            resized = up.resized(chunk)
            for i, q in enumerate(chunk):
                resized_pos = resized[i] > 0
                win = up.window(resized_pos)
                if win is None:
                    continue  # no positive pixel: mask score 0, never kept
                rows, cols = win
                values = up.window_logits(resized[i], win)
                positive = values > 0
                # count_nonzero: a bool .sum() would first copy the window to int64
                mask_score = float(values.sigmoid_().mul_(positive).sum()) / (int(positive.count_nonzero()) + 1e-6)
                for cand in by_query[q]:
                    score = cand.class_prob * mask_score
                    if is_human_pass:
                        if score > SCORE_CUT:
                            humans.append(KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score))
                            full = np.zeros(original_hw, dtype=bool)
                            full[rows, cols] = positive.numpy()
                            human_masks.append(full)
                            human_resized.append(resized_pos)
                    elif score >= SCORE_CUT:
                        overlap = tuple(int((resized_pos & h).sum()) for h in human_resized)
                        parts.append(KeptInstance(q, cand.class_id, cand.class_prob, mask_score, score, overlap))
                        win_best = best[rows, cols]  # views: writing them writes the maps
                        wins = torch.lt(win_best, score).logical_and_(positive)
                        win_best.masked_fill_(wins, score)
                        label_map[rows, cols].masked_fill_(wins, cand.class_id)
    return PostprocessOutput(parts, humans, human_masks, label_map.numpy(), up)




# ---------------------------------------------------------------------------------------------
# inputs, timing, comparison
# ---------------------------------------------------------------------------------------------


def cpu_description() -> str:
    name, flags = platform.processor() or "?", ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = line
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return f"{name}; flags: {' '.join(f for f in wanted if f' {f}' in flags) or 'none of ' + ','.join(wanted)}"


def network_inputs(sizes: list[str], path: Path, threads: int) -> dict[str, dict]:
    """pred_logits/pred_masks of the untrained full-size model on the synthetic photo, cached at ``path``."""
    cached: dict[str, dict] = torch.load(path) if path.exists() else {}
    missing = [s for s in sizes if s not in cached]
    if missing:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_parse import synthetic_photo

        from dicom_node.model.checkpoint import load_model_dir
        from dicom_node.model.preprocess import prepare_image
        from dicom_node.model.untrained import make_test_model_dir

        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            loaded = load_model_dir(make_test_model_dir(Path(tmp) / "m2fp_untrained"))
        model, cfg = loaded.model.prepare_for_inference(), loaded.config
        for size in missing:
            w, h = (int(v) for v in size.split("x"))
            p = prepare_image(synthetic_photo(w, h), cfg.min_size, cfg.max_size, cfg.size_divisibility,
                              cfg.pixel_mean, cfg.pixel_std)
            with torch.inference_mode():
                out = model(p.tensor)
            cached[size] = {"pred_logits": out["pred_logits"][0].clone(), "pred_masks": out["pred_masks"][0].clone(),
                            "padded_hw": p.padded_hw, "resized_hw": p.resized_hw, "original_hw": p.original_hw,
                            "human_class": cfg.num_parsing}
        torch.save(cached, path)
    return {s: cached[s] for s in sizes}


def synthetic_inputs(size: str, seed: int = 0) -> dict:
    """Random smooth logits shaped like the full model's (100 queries, 21 classes + no-object)."""
    from dicom_node.model.preprocess import target_size

    w, h = (int(v) for v in size.split("x"))
    resized = target_size(h, w)
    padded = tuple(-(-s // 32) * 32 for s in resized)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(100, 22, generator=gen) * 4
    masks = torch.randn(100, padded[0] // 4, padded[1] // 4, generator=gen)
    masks = F.avg_pool2d(masks[None], 5, 1, 2)[0] * 6 - 1
    masks[:10] = -5.0
    return {"pred_logits": logits, "pred_masks": masks, "padded_hw": padded, "resized_hw": resized,
            "original_hw": (h, w), "human_class": 20}


def run(fn, inp: dict) -> PostprocessOutput:
    with torch.inference_mode():
        return fn(inp["pred_logits"], inp["pred_masks"], inp["padded_hw"], inp["resized_hw"], inp["original_hw"],
                  inp["human_class"])


def assert_identical(old: PostprocessOutput, new: PostprocessOutput, check_part_masks: bool = True) -> None:
    """Every output bit for bit: instances (float equality of every score), masks, label map."""
    assert old.parts == new.parts, "kept parts differ"
    assert old.humans == new.humans, "kept humans differ"
    assert len(old.human_masks) == len(new.human_masks)
    for a, b in zip(old.human_masks, new.human_masks, strict=True):
        assert np.array_equal(a, b), "a human mask differs"
    assert old.label_map.dtype == new.label_map.dtype and np.array_equal(old.label_map, new.label_map), \
        "label map differs"
    if check_part_masks:
        for part in new.parts:
            assert np.array_equal(old.upsampler.full_mask(part.query_index),
                                  new.upsampler.full_mask(part.query_index)), f"part mask {part.query_index} differs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1024x768,4000x3000")
    ap.add_argument("--inputs", type=Path, default=Path(tempfile.gettempdir()) / "dicom-node-bench-postprocess.pt")
    ap.add_argument("--synthetic", action="store_true", help="random smooth logits instead of the untrained model's")
    args = ap.parse_args()

    from dicom_node.allocator import keep_freed_memory

    keep_freed_memory()  # as the parsing engine does
    torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    inputs = ({s: synthetic_inputs(s) for s in sizes} if args.synthetic
              else network_inputs(sizes, args.inputs, args.threads))
    print(f"exact postprocess, OLD (before issue 17) vs NEW; {args.threads} threads; {args.runs} runs after a "
          f"warm-up, interleaved; inputs: {'synthetic' if args.synthetic else 'untrained full-size model'}")
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    kernel = window_kernel.kernel()
    print("window kernel: " + ("built, checked exact" if kernel is not None and native_is_exact() else
                               "NOT in use (no C compiler, or its check failed): NEW = NEW without kernel"))
    for size, inp in inputs.items():
        old_out, new_out = run(old_postprocess, inp), run(postprocess, inp)  # warm-up
        assert_identical(old_out, new_out)
        assert_identical(old_out, run(postprocess_without_kernel, inp))
        times: dict[str, list[float]] = {"old": [], "new": [], "aten": []}
        for _ in range(args.runs):
            for name, fn in (("old", old_postprocess), ("new", postprocess), ("aten", postprocess_without_kernel)):
                t = time.perf_counter()
                out = run(fn, inp)
                times[name].append(time.perf_counter() - t)
                assert_identical(old_out, out, check_part_masks=False)
        old_s, new_s, aten_s = (statistics.median(times[k]) for k in ("old", "new", "aten"))
        print(f"{size}: {len(new_out.parts)} parts, {len(new_out.humans)} humans; OLD median {old_s:.3f} s "
              f"(min {min(times['old']):.3f}), NEW median {new_s:.3f} s (min {min(times['new']):.3f}), "
              f"NEW without the window kernel {aten_s:.3f} s; speed-up {old_s / new_s:.2f}x "
              f"(kernel: {aten_s / new_s:.2f}x); outputs bit-identical "
              f"(instances, human masks, label map, {len(new_out.parts)} part masks)")


def postprocess_without_kernel(*args, **kwargs) -> PostprocessOutput:
    """NEW on its ATen path (what a node without a C compiler runs)."""
    real = window_kernel.kernel
    setattr(window_kernel, "kernel", lambda: None)  # noqa: B010 - a module function, swapped for one call
    try:
        return postprocess(*args, **kwargs)
    finally:
        setattr(window_kernel, "kernel", real)  # noqa: B010


if __name__ == "__main__":
    main()
