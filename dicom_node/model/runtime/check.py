"""``python -m dicom_node.model.runtime.check JOB``: the agreement checks, in a process of their own.

Started by :func:`dicom_node.model.runtime.choice.choose_runtime` (which holds the cache lock
meanwhile); JOB is a JSON object with the model directory, the candidates and where to write the
results.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from dicom_node.lifetime import die_with_parent
from dicom_node.logs import fields
from dicom_node.model.runtime.agreement import Agreement, check_agreement, reference_run
from dicom_node.model.runtime.base import NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import read_json, write_json
from dicom_node.model.runtime.choice import best_candidate
from dicom_node.model.runtime.eager import EagerRuntime
from dicom_node.model.runtime.names import RuntimeName
from dicom_node.model.runtime.noise import measure_thresholds
from dicom_node.model.runtime.registry import build_runtime, prepare_kwargs

log = logging.getLogger(__name__)


def run_checks(model_dir: str, names: list[str], threads: int | None, requested: str, results_path: str,
               keys: dict[str, str]) -> None:
    """Load the model, measure eager once, check each candidate, record the results."""
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
    if requested == RuntimeName.AUTO:  # graphs of a runtime that will not be used are not kept
        best = best_candidate(checked, requested)
        kept = None if best is None else built[best.runtime].cache_family or best.runtime
        for name, runtime in built.items():
            if (runtime.cache_family or name) != kept:  # openvino-bf16 reads openvino's graphs
                runtime.clear_cache()


def main(argv: list[str]) -> int:
    die_with_parent()
    job = json.loads(argv[1])
    from dicom_node.logs import setup_logging

    setup_logging(logging.getLevelName(job["log_level"]))
    run_checks(job["model_dir"], job["names"], job["threads"], job["requested"], job["results_path"], job["keys"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
