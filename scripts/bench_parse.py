"""Benchmark: seconds per photo and peak memory of M2FP parsing on the CPU.

Runs the full-size UNTRAINED model (random weights, official architecture; speed does not
depend on the weights' values, except through how many instances survive the score cut,
which is printed) with 2 torch threads, each photo size in a fresh process so its peak RSS is
its own. The baseline is the official ModelScope pipeline measured on this machine kind
(../shared/notes/m2fp-model.md): 5.4-6.5 s and 3.0 GiB per 1024x768 photo.

    .venv/bin/python scripts/bench_parse.py [--runs 5] [--sizes 1024x768,4000x3000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = {"1024x768": {"median_s": (5.4, 6.5), "peak_rss_gib": 3.0}}
TARGET = {"1024x768": {"median_s": 3.0, "peak_rss_gib": 2.0}}


def synthetic_photo(width: int, height: int):
    """The parity fixture's image scaled to the size asked: shapes, gradients and a stick figure."""
    import numpy as np
    from PIL import Image

    src = Image.open(ROOT / "tests" / "data" / "m2fp_parity" / "input.png").convert("RGB")
    return np.asarray(src.resize((width, height), Image.BILINEAR)).copy()


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from dicom_node.parse.engine import HumanParser

    w, h = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    parser = HumanParser.from_model_dir(args.model_dir, threads=args.threads, postprocess_mode=args.postprocess)
    load_s = time.perf_counter() - t0
    rgb = synthetic_photo(w, h)
    parser.parse(rgb)  # warm-up
    times, parts = [], {}
    stages: dict[str, list[float]] = {}
    for _ in range(args.runs):
        t = time.perf_counter()
        result = parser.parse(rgb)
        times.append(time.perf_counter() - t)
        for k, v in result.timings_s.items():
            stages.setdefault(k, []).append(v)
        parts = {"parts": len(result.parts), "persons": result.person_count}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "size": args.size, "postprocess": args.postprocess, "runs": args.runs,
        "median_s": statistics.median(times), "min_s": min(times),
        "max_s": max(times), "peak_rss_gib": peak_kib / 2**20, "load_s": load_s,
        "stage_median_s": {k: statistics.median(v) for k, v in stages.items()}, **parts,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1024x768,4000x3000")
    ap.add_argument("--postprocess", default="exact,fast",
                    help="postprocess modes to run: exact (official semantics), fast (network-input size)")
    ap.add_argument("--model-dir", type=Path, default=None, help="default: a fresh untrained full-size model")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from dicom_node.model.untrained import make_test_model_dir

            model_dir = make_test_model_dir(Path(tmp) / "m2fp_untrained")
        rows = []
        for mode in args.postprocess.split(","):
            for size in args.sizes.split(","):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "--size", size, "--runs", str(args.runs), "--threads",
                     str(args.threads), "--model-dir", str(model_dir), "--postprocess", mode],
                    capture_output=True, text=True, check=True,
                    env={**os.environ, "DICOM_NODE_LOG_LEVEL": "ERROR"},
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"M2FP parse benchmark: UNTRAINED full-size model, {args.threads} threads, {args.runs} runs after warm-up")
    print(f"{'post':>5} {'photo':>10} {'median s':>9} {'min s':>7} {'max s':>7} {'peak RSS GiB':>13} {'parts':>6}"
          f" {'persons':>8}  stages (median s)")
    for r in rows:
        st = " ".join(f"{k}={v:.3f}" for k, v in r["stage_median_s"].items())
        print(f"{r['postprocess']:>5} {r['size']:>10} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f}"
              f" {r['peak_rss_gib']:13.2f}"
              f" {r['parts']:6d} {r['persons']:8d}  {st}")
    for r in rows:
        base = BASELINE.get(r["size"])
        if base:
            lo, hi = base["median_s"]
            print(f"{r['size']} ({r['postprocess']}): official pipeline {lo}-{hi} s, {base['peak_rss_gib']} GiB "
                  "(notes, same machine kind) "
                  f"-> speed-up {lo / r['median_s']:.2f}-{hi / r['median_s']:.2f}x, "
                  f"memory ratio {r['peak_rss_gib'] / base['peak_rss_gib']:.2f}")
        tgt = TARGET.get(r["size"])
        if tgt:
            ok = r["median_s"] <= tgt["median_s"] and r["peak_rss_gib"] <= tgt["peak_rss_gib"]
            print(f"{r['size']} ({r['postprocess']}): target <= {tgt['median_s']} s and <= {tgt['peak_rss_gib']} GiB: "
                  f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
