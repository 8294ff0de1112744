"""How far eager fp32 moves from itself when the photo changes imperceptibly: the noise floor
that :mod:`dicom_node.model.runtime.agreement`'s rule is built on, and each runtime against it.

1. Eager fp32 on the reference images (the parity fixture's 1024x768 landscape and 480x640
   portrait) against eager fp32 on the same images changed in ways no user could see: a JPEG
   quality 95 re-encode, a 1-pixel shift in each direction (the result compared on the overlap,
   shifted back), one grey level brighter and darker. Printed per image and perturbation: label
   agreement, fp32 instances, those without a same-class match at mask IoU >= 0.95 (and their
   fp32 scores), instances added, the largest change of a class's share of the photo, people,
   and issue 5's (query, class) matching for comparison. Then the worst case over both images
   per perturbation, which is what the rule's constants are.
2. With ``--runtimes``: each runtime's network time per image (medians of ``--runs`` in this one
   process, eager measured first in the same run) and both rules' verdicts.

    .venv/bin/python scripts/agreement_noise.py [--model-dir DIR] [--threads 2]
        [--runtimes openvino,openvino-bf16,eager-bf16,eager-int8] [--runs 5]

Without ``--model-dir`` it builds the full-size model with the parity fixture's weights (what
``dicom-node model make-test`` writes) in a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import tempfile
from pathlib import Path

from dicom_node.model.runtime.noise import CHECK_PERTURBATIONS, PERTURBATIONS, noise_floor, overlap


def cpu_name() -> str:
    from dicom_node.model.runtime.cpu import NATIVE_BF16_FLAGS, VNNI_FLAGS, cpu_flags

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    have = [f for f in (*NATIVE_BF16_FLAGS, *VNNI_FLAGS) if f in flags]
    return f"{model}, {isa}, {', '.join(have) or 'no bf16/VNNI'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", default="", help="comma-separated runtimes to time and judge (besides eager)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per image and runtime, after one warm-up")
    ap.add_argument("--no-noise", action="store_true", help="only the runtimes (skip the perturbation table)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from dicom_node.model.checkpoint import load_model_dir
    from dicom_node.model.preprocess import prepare_image
    from dicom_node.model.runtime import agreement as ag
    from dicom_node.model.runtime.eager import EagerRuntime
    from dicom_node.model.runtime.registry import build_runtime, prepare_kwargs
    from dicom_node.model.untrained import make_test_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_test_model_dir(Path(tmp) / "m2fp_untrained")
        loaded = load_model_dir(model_dir)
        loaded.model.prepare_for_inference()
        human = loaded.config.num_parsing
        kwargs = prepare_kwargs(loaded)
        eager = EagerRuntime(loaded.model)
        images = ag.reference_images()
        print(f"M2FP agreement noise floor: model {model_dir} ({loaded.digest[:16]}), {args.threads} threads, "
              f"torch {torch.__version__}")
        print(f"CPU: {cpu_name()}")
        reference = ag.reference_run(eager, kwargs, human, images, timed_runs=args.runs if args.runtimes else 1)

        print(f"\n{'perturbation':<16} {'image':<10} {'label agr %':>11} {'fp32 inst':>9} {'unmatched':>9} "
              f"{'added':>5} {'share pp':>8} {'(class)':>8} {'persons':>7} {'lost by q':>9} {'min IoU q':>9}"
              "  unmatched fp32 scores")
        worst: dict[str, list] = {}
        for name, (change, (dy, dx)) in ({} if args.no_noise else PERTURBATIONS).items():
            per_image = []
            for rgb, fp32, label in zip(images, reference.parsings, ("landscape", "portrait"), strict=True):
                prepared = prepare_image(change(rgb), **kwargs)
                other = ag.parsing_of(ag.parse_prepared(eager.forward(prepared.tensor), prepared, human), human)
                height, width = fp32.label_map.shape
                ref_win, other_win = overlap(height, width, dy, dx)
                d = ag.compare(fp32.crop(*ref_win), other.crop(*other_win))
                per_image.append(d)
                cls = loaded.config.classes[d.class_share_class] if d.class_share_class < human else "Human"
                print(f"{name:<16} {label:<10} {d.label_agreement * 100:11.3f} {d.fp32_instances:9d} "
                      f"{d.unmatched_fp32:9d} {d.unmatched_other:5d} {d.class_share_pp:8.3f} {cls[:8]:>8} "
                      f"{d.persons_fp32:>3d}/{d.persons_other:<3d} {d.lost_by_query:9d} {d.min_iou_by_query:9.4f}  "
                      f"{', '.join(f'{s:.2f}' for s in d.unmatched_fp32_scores)}")
            worst[name] = per_image
        print("\nWorst over both images, per perturbation (the rule's NOISE_* constants are the worst row):")
        print(f"{'perturbation':<16} {'label agr %':>11} {'unmatched':>13} {'added':>5} {'share pp':>8} "
              f"{'persons':>7}  new rule / issue-5 rule")
        floor = {"label": 1.0, "unmatched": 0.0, "share": 0.0}
        for name, diffs in worst.items():
            a = ag.agreement_of("fp32+" + name, diffs, 0.0, 0.0, None)
            floor["label"] = min(floor["label"], a.label_agreement)
            floor["unmatched"] = max(floor["unmatched"], max(a.unmatched_fp32, a.unmatched_other) / a.fp32_instances)
            floor["share"] = max(floor["share"], a.class_share_pp)
            print(f"{name:<16} {a.label_agreement * 100:11.3f} {a.unmatched_fp32:5d} of {a.fp32_instances:<4d} "
                  f"{a.unmatched_other:5d} {a.class_share_pp:8.3f} {'same' if not a.person_count_diff else 'DIFF':>7}  "
                  f"{'passes' if a.passed else 'FAILS'} / {'passes' if a.passed_issue5 else 'fails'}")
        if worst:
            print(f"\nnoise floor: label agreement {floor['label'] * 100:.3f} %, "
                  f"unmatched fraction {floor['unmatched']:.4f}, class share {floor['share']:.3f} pp")
        print(f"fixed ceiling in agreement.py: label agreement >= {ag.LABEL_AGREEMENT_FLOOR * 100:.3f} % "
              f"(noise {ag.NOISE_LABEL_AGREEMENT * 100:.3f} % - margin {ag.LABEL_AGREEMENT_MARGIN * 100:.2f} pp), "
              f"unmatched/added <= floor({ag.UNMATCHED_FRACTION_MAX:.4f} x n) = "
              f"{ag.allowed_unmatched(reference_instances(reference))} of {reference_instances(reference)}, "
              f"class share <= {ag.CLASS_SHARE_PP_MAX:.3f} pp, equal person count")
        # what the check derives for this model from CHECK_PERTURBATIONS (as at a node's first start)
        if all(name in worst for name in CHECK_PERTURBATIONS):
            label, unmatched, share = noise_floor({name: worst[name] for name in CHECK_PERTURBATIONS})
            reference.thresholds = ag.Thresholds.from_noise(label, unmatched, share, "this model's fp32 noise")
        else:
            from dicom_node.model.runtime.noise import measure_thresholds

            reference.thresholds = measure_thresholds(eager, reference, kwargs, images=images)
        t = reference.thresholds
        print(f"this model's rule (the check's perturbations: {', '.join(CHECK_PERTURBATIONS)}): label agreement >= "
              f"{t.label_agreement_floor * 100:.3f} %, unmatched/added <= floor({t.unmatched_fraction_max:.4f} x n) = "
              f"{ag.allowed_unmatched(reference_instances(reference), t)} of {reference_instances(reference)}, "
              f"class share <= {t.class_share_pp_max:.3f} pp, equal person count")

        if args.runtimes:
            eager_1024 = statistics.median(reference.times[0])
            print(f"\nNetwork time, medians of {args.runs} after one warm-up, one process "
                  f"(1024x768 = the landscape image, network input {tuple(reference.prepared[0].padded_hw)}):")
            print(f"{'runtime':<14} {'1024x768 s':>10} {'(min-max)':>13} {'vs eager':>8} {'480x640 s':>9}  "
                  "new rule | issue-5 rule")
            print(f"{'eager':<14} {eager_1024:10.3f} ({min(reference.times[0]):.2f}-{max(reference.times[0]):.2f}) "
                  f"{1.0:7.2f}x {statistics.median(reference.times[1]):9.3f}  the reference")
            for name in args.runtimes.split(","):
                from dicom_node.model.runtime.base import RuntimeUnavailable
                from dicom_node.model.runtime.choice import cpu_refusal

                refusal = cpu_refusal(name)
                if refusal:
                    print(f"{name:<14} not run: {refusal}")
                    continue
                try:
                    runtime = build_runtime(name, loaded, args.threads)
                    times: list[list[float]] = []
                    result = ag.check_agreement(runtime, reference, timed_runs=args.runs, times=times)
                except RuntimeUnavailable as exc:
                    print(f"{name:<14} unavailable: {exc}")
                    continue
                t = statistics.median(times[0])
                print(f"{name:<14} {t:10.3f} ({min(times[0]):.2f}-{max(times[0]):.2f}) {eager_1024 / t:7.2f}x "
                      f"{statistics.median(times[1]):9.3f}  {'PASSES' if result.passed else 'fails'} | "
                      f"{'passes' if result.passed_issue5 else 'fails'}: {result.summary()}")
                del runtime
                gc.collect()


def reference_instances(reference) -> int:
    return sum(len(p.classes) for p in reference.parsings)


if __name__ == "__main__":
    main()
