"""Inference runtimes of the M2FP network, and the choice of one by measurement.

``eager`` is the reference (native PyTorch, fp32). The others are candidates: ``openvino`` (the
same fp32 network as an exported OpenVINO graph per input shape) and ``eager-int8`` (an int8
backbone). ``auto`` (the default of the node and of ``dicom-node parse``) checks every
candidate against the reference on the parity fixture's images (:mod:`.agreement`) and uses
the fastest one that passes and beats eager by ``MIN_SPEEDUP``, else the reference. The check
runs once per model, machine and package versions, in a process of its own; its result is kept
beside the model and every start logs the choice and the measured agreement.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from dicom_node.config import RUNTIME_CHOICES
from dicom_node.logs import fields
from dicom_node.model.checkpoint import LoadedModel
from dicom_node.model.runtime.agreement import Agreement, check_agreement, reference_run
from dicom_node.model.runtime.base import NetworkOutput, NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import cache_dir_for, locked, machine_signature, read_json, write_json
from dicom_node.model.runtime.eager import EagerRuntime

log = logging.getLogger(__name__)

RUNTIMES = tuple(name for name in RUNTIME_CHOICES if name != "auto")
CANDIDATES = tuple(name for name in RUNTIMES if name != "eager")
# ``auto`` takes a candidate only if it beat eager by this much in the same measurement: less is
# within this machine's run-to-run noise (15-25 %) and not worth a graph export and its disk.
MIN_SPEEDUP = 1.10

__all__ = ["RUNTIMES", "RUNTIME_CHOICES", "Agreement", "NetworkOutput", "NetworkRuntime", "RuntimeChoice",
           "RuntimeUnavailable", "build_runtime", "choose_runtime", "prepare_kwargs"]


def prepare_kwargs(loaded: LoadedModel) -> dict:
    """The preprocessing parameters of this model's configuration, as ``prepare_image`` takes them."""
    cfg = loaded.config
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, "size_divisibility": cfg.size_divisibility,
            "pixel_mean": cfg.pixel_mean, "pixel_std": cfg.pixel_std}


def build_runtime(name: str, loaded: LoadedModel, threads: int | None = None) -> NetworkRuntime:
    """One runtime over a loaded model (prepared for inference). Raises RuntimeUnavailable."""
    if name == "eager":
        return EagerRuntime(loaded.model)
    if name == "openvino":
        from dicom_node.model.runtime.openvino import OpenVinoRuntime

        return OpenVinoRuntime(loaded.model, loaded.digest, cache_dir_for(loaded.model_dir, loaded.digest), threads)
    if name == "eager-int8":
        from dicom_node.model.preprocess import prepare_image
        from dicom_node.model.runtime.agreement import reference_images
        from dicom_node.model.runtime.int8 import Int8BackboneRuntime

        calibration = [prepare_image(rgb, **prepare_kwargs(loaded)).tensor for rgb in reference_images()]
        return Int8BackboneRuntime(loaded.model, calibration)
    raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_CHOICES)}")


@dataclass
class RuntimeChoice:
    runtime: NetworkRuntime
    agreement: Agreement | None  # the chosen runtime's check (None for the eager reference)
    checked: dict[str, Agreement | str] = field(default_factory=dict)  # every candidate: its check, or why not

    def summary(self) -> str:
        if self.agreement is None:
            return f"{self.runtime.describe()}: the reference"
        return f"{self.runtime.describe()}: {self.agreement.summary()}"


def _versions() -> str:
    parts = [f"torch={torch.__version__}"]
    try:
        parts.append(f"openvino={metadata.version('openvino')}")
    except metadata.PackageNotFoundError:
        pass
    return " ".join(parts)


def _check_key(name: str, threads: int | None) -> str:
    return f"{name} threads={threads or torch.get_num_threads()} {_versions()} cpu={machine_signature()}"


def choose_runtime(requested: str, loaded: LoadedModel, threads: int | None = None,
                   candidates: tuple[str, ...] = CANDIDATES) -> RuntimeChoice:
    """The runtime to parse with: ``eager``, a named candidate (used only if it passes its
    check), or ``auto`` (the fastest candidate that passes and beats eager by ``MIN_SPEEDUP``,
    else eager)."""
    if requested not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIME_CHOICES)}")
    eager = EagerRuntime(loaded.model)
    if requested == "eager":
        choice = RuntimeChoice(eager, None)
        _log_choice(choice, requested, loaded)
        return choice
    names = candidates if requested == "auto" else (requested,)
    cache = cache_dir_for(loaded.model_dir, loaded.digest)
    results_path = cache / f"agreement-{loaded.digest[:16]}.json"
    keys = {name: _check_key(name, threads) for name in names}
    with locked(cache, "agreement"):  # one process measures; the others read its results
        missing = [name for name in names if keys[name] not in read_json(results_path)]
        failure = _check_in_child(loaded, missing, threads, requested, results_path) if missing else None
        results = read_json(results_path)
    checked: dict[str, Agreement | str] = {}
    for name in names:
        if keys[name] in results:
            checked[name] = Agreement(**results[keys[name]])
            if name in missing:
                _log_check(checked[name], loaded)
        else:
            checked[name] = failure or "unavailable: not checked"
    choice = RuntimeChoice(eager, None, checked)
    best = _best(checked, requested)
    if best is not None:
        try:
            choice = RuntimeChoice(build_runtime(best.runtime, loaded, threads), best, checked)
        except RuntimeUnavailable as exc:
            checked[best.runtime] = f"unavailable: {exc}"
    _log_choice(choice, requested, loaded)
    return choice


def _best(checked: dict[str, Agreement | str], requested: str) -> Agreement | None:
    """The passing candidate to use: for ``auto`` only one clearly faster than eager."""
    passing = [a for a in checked.values() if isinstance(a, Agreement) and a.passed]
    if requested == "auto":
        passing = [a for a in passing if a.speedup >= MIN_SPEEDUP]
    return min(passing, key=lambda a: a.network_s / a.eager_network_s) if passing else None


def _check_in_child(loaded: LoadedModel, names: list[str], threads: int | None, requested: str,
                    results_path: Path) -> str | None:
    """Run the checks in a fresh process (:mod:`.check`); None, or why they could not run.

    Exporting and checking the full model peaks near 6 GiB, and a parsing process keeps its
    high-water mark (:mod:`dicom_node.allocator`): done here, a worker would hold that memory
    for ever. A plain subprocess, because node workers are daemonic and may not fork children of
    their own through multiprocessing. It logs to our stderr and writes ``results_path``.
    """
    job = {"model_dir": str(loaded.model_dir), "names": names, "threads": threads, "requested": requested,
           "results_path": str(results_path), "keys": {n: _check_key(n, threads) for n in names},
           "log_level": logging.getLogger().getEffectiveLevel()}
    done = subprocess.run([sys.executable, "-m", "dicom_node.model.runtime.check", json.dumps(job)], check=False)
    if done.returncode != 0:
        return f"unavailable: the check process failed (exit code {done.returncode})"
    return None


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
    reference = reference_run(EagerRuntime(loaded.model), prepare_kwargs(loaded), loaded.config.num_parsing)
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
        results = read_json(path)
        results[keys[name]] = agreement.as_dict()
        write_json(path, results)
    if requested == "auto":  # graphs of a runtime that will not be used are not kept
        best = _best(checked, requested)
        for name, runtime in built.items():
            if best is None or name != best.runtime:
                runtime.clear_cache()


def _log_check(agreement: Agreement, loaded: LoadedModel) -> None:
    log.info(fields(event="runtime.checked", runtime=agreement.runtime, passed=agreement.passed,
                    label_agreement=f"{agreement.label_agreement:.5f}",
                    min_instance_iou=f"{agreement.min_instance_iou:.4f}", lost_instances=agreement.lost_instances,
                    network_s=f"{agreement.network_s:.3f}", eager_network_s=f"{agreement.eager_network_s:.3f}",
                    export_s=None if agreement.export_s is None else f"{agreement.export_s:.1f}",
                    model=loaded.digest[:16]))


def _log_choice(choice: RuntimeChoice, requested: str, loaded: LoadedModel) -> None:
    others = "; ".join(f"{name}: {'passed' if isinstance(r, Agreement) and r.passed else 'rejected'} "
                       f"({r.summary() if isinstance(r, Agreement) else r})" for name, r in choice.checked.items()
                       if name != choice.runtime.name)
    log.info(fields(event="runtime.selected", requested=requested, runtime=choice.runtime.name,
                    agreement=choice.summary(), others=others or None, model=loaded.digest[:16]))
    if requested not in ("auto", "eager") and choice.runtime.name != requested:
        log.warning(fields(event="runtime.refused", requested=requested, runtime=choice.runtime.name,
                           reason=str(choice.checked.get(requested, "not checked"))))
