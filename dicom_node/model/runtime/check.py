"""``python -m dicom_node.model.runtime.check JOB``: the agreement checks, in a process of their own.

Started by :func:`dicom_node.model.runtime.choice.choose_runtime` (which holds the cache lock
meanwhile); JOB is a JSON object with the model directory, the candidates and where to write the
results. With ``"kind": "memory"`` it measures one runtime's resident peak instead (started by the
checks themselves, one fresh process per runtime: :func:`peak_in_child`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from dicom_node.lifetime import die_with_parent
from dicom_node.logs import fields
from dicom_node.model.runtime.agreement import Agreement, check_agreement, reference_run
from dicom_node.model.runtime.base import NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import read_json, write_json
from dicom_node.model.runtime.choice import auto_eligible, best_candidate
from dicom_node.model.runtime.eager import EagerRuntime
from dicom_node.model.runtime.names import DEFAULT_MAX_RSS_MIB, RuntimeName
from dicom_node.model.runtime.noise import measure_thresholds
from dicom_node.model.runtime.registry import build_runtime, prepare_kwargs

log = logging.getLogger(__name__)


def run_checks(model_dir: str, names: list[str], threads: int | None, requested: str, results_path: str,
               keys: dict[str, str], max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> None:
    """Load the model, measure eager once, check each candidate, record the results; for
    ``auto``, also the resident peak of each candidate it could take, and of eager."""
    if threads:
        torch.set_num_threads(threads)
    from dicom_node.allocator import keep_freed_memory
    from dicom_node.model.checkpoint import load_model_dir

    keep_freed_memory()
    loaded = load_model_dir(model_dir)
    loaded.model.prepare_for_inference()
    eager = EagerRuntime(loaded.model)
    reference = reference_run(eager, prepare_kwargs(loaded), loaded.config.num_parsing)
    # judged by this model's own noise (issue 17), measured once with the check
    reference.thresholds = measure_thresholds(eager, reference, prepare_kwargs(loaded))
    path = Path(results_path)
    built: dict[str, NetworkRuntime] = {}
    checked: dict[str, Agreement | str] = {}
    for name in names:
        try:
            built[name] = build_runtime(name, loaded, threads)
            checked[name] = agreement = check_agreement(built[name], reference)
        except RuntimeUnavailable as exc:
            log.warning(fields(event="runtime.unavailable", runtime=name, reason=str(exc)))
            continue
        except Exception as exc:  # a candidate that breaks (a plugin's error) must not cost the others their check
            log.warning(fields(event="runtime.unavailable", runtime=name, reason=f"the check failed: {exc!r}"[:500]))
            continue
        results = read_json(path)
        results[keys[name]] = agreement.as_dict()
        write_json(path, results)
    if requested == RuntimeName.AUTO:
        eligible = auto_eligible([a for a in checked.values() if isinstance(a, Agreement)])
        eager_peak = peak_in_child(model_dir, RuntimeName.EAGER, threads) if eligible else None
        for agreement in eligible:
            checked[agreement.runtime] = measured = dataclasses.replace(
                agreement, peak_rss_mib=peak_in_child(model_dir, agreement.runtime, threads),
                eager_peak_rss_mib=eager_peak)
            results = read_json(path)
            results[keys[agreement.runtime]] = measured.as_dict()
            write_json(path, results)
        # graphs of a runtime that will not be used are not kept
        best = best_candidate(checked, requested, max_rss_mib)
        kept = None if best is None else built[best.runtime].cache_family or best.runtime
        for name, runtime in built.items():
            if (runtime.cache_family or name) != kept:  # openvino-bf16 reads openvino's graphs
                runtime.clear_cache()


def peak_in_child(model_dir: str, name: str, threads: int | None) -> float | None:
    """The resident peak (MiB) of a fresh process that does what a worker does before its first
    photo is done: load the model, build runtime ``name`` (from the graphs the check cached) and
    run the network on the reference images. None, with a warning, if that process failed.

    A process of its own: the checking process has exported graphs and built every candidate, so
    its own peak says nothing about a worker's.
    """
    job = {"kind": "memory", "model_dir": model_dir, "runtime": name, "threads": threads,
           "log_level": logging.getLogger().getEffectiveLevel()}
    done = subprocess.run([sys.executable, "-m", "dicom_node.model.runtime.check", json.dumps(job)],
                          stdout=subprocess.PIPE, text=True, check=False)
    found = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("peak_rss_mib=")]
    if done.returncode != 0 or not found:
        log.warning(fields(event="runtime.memory_unmeasured", runtime=name, exit_code=done.returncode))
        return None
    peak = float(found[-1])
    log.info(fields(event="runtime.memory", runtime=name, peak_rss_mib=f"{peak:.0f}"))
    return peak


def memory_run(model_dir: str, name: str, threads: int | None) -> float:
    """In the memory process: a worker's start and the reference images; the resident peak, MiB."""
    if threads:
        torch.set_num_threads(threads)
    from dicom_node.allocator import keep_freed_memory, peak_resident_gib
    from dicom_node.model.checkpoint import load_model_dir
    from dicom_node.model.preprocess import prepare_image
    from dicom_node.model.runtime.agreement import reference_images

    keep_freed_memory()
    loaded = load_model_dir(model_dir)
    loaded.model.prepare_for_inference()
    runtime = build_runtime(name, loaded, threads)
    for rgb in reference_images():
        runtime.forward(prepare_image(rgb, **prepare_kwargs(loaded)).tensor)
    return peak_resident_gib() * 1024


def main(argv: list[str]) -> int:
    die_with_parent()
    job = json.loads(argv[1])
    from dicom_node.logs import setup_logging

    setup_logging(logging.getLevelName(job["log_level"]))
    if job.get("kind") == "memory":
        print(f"peak_rss_mib={memory_run(job['model_dir'], job['runtime'], job['threads']):.1f}", flush=True)
        return 0
    run_checks(job["model_dir"], job["names"], job["threads"], job["requested"], job["results_path"], job["keys"],
               job.get("max_rss_mib", DEFAULT_MAX_RSS_MIB))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
