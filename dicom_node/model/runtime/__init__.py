"""Inference runtimes of the M2FP network, and the choice of one by measurement.

``eager`` is the reference (native PyTorch, fp32). The others are candidates: ``openvino`` (the
same fp32 network as an exported OpenVINO graph per input shape) and ``eager-int8`` (an int8
backbone). ``auto`` (the default of the node and of ``dicom-node parse``) checks every
candidate against the reference on the parity fixture's images (:mod:`.agreement`) and uses
the fastest one that passes, else the reference. The check runs once per model, machine and
package versions; its result is kept beside the model and every start logs the choice and the
measured agreement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata

import torch

from dicom_node.logs import fields
from dicom_node.model.checkpoint import LoadedModel
from dicom_node.model.runtime.agreement import Agreement, ReferenceRun, check_agreement, reference_run
from dicom_node.model.runtime.base import NetworkOutput, NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import cache_dir_for, locked, machine_signature, read_json, write_json
from dicom_node.model.runtime.eager import EagerRuntime

log = logging.getLogger(__name__)

CANDIDATES = ("openvino", "eager-int8")
RUNTIMES = ("eager", *CANDIDATES)
RUNTIME_CHOICES = ("auto", *RUNTIMES)

__all__ = ["RUNTIMES", "RUNTIME_CHOICES", "Agreement", "NetworkOutput", "NetworkRuntime", "RuntimeChoice",
           "RuntimeUnavailable", "build_runtime", "choose_runtime"]


def _prepare_kwargs(loaded: LoadedModel) -> dict:
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

        calibration = [prepare_image(rgb, **_prepare_kwargs(loaded)).tensor for rgb in reference_images()]
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
    check), or ``auto`` (the fastest candidate that passes, else eager)."""
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
    reference: list[ReferenceRun] = []  # computed at most once, only if some check must run

    def get_reference() -> ReferenceRun:
        if not reference:
            reference.append(reference_run(eager, _prepare_kwargs(loaded), loaded.config.num_parsing))
        return reference[0]

    checked: dict[str, Agreement | str] = {}
    built: dict[str, NetworkRuntime] = {}
    with locked(cache, "agreement"):  # one process measures; the others read its results
        results = read_json(results_path)
        for name in names:
            key = _check_key(name, threads)
            if key in results:
                checked[name] = Agreement(**results[key])
                continue
            try:
                runtime = build_runtime(name, loaded, threads)
                agreement = check_agreement(runtime, get_reference())
            except RuntimeUnavailable as exc:
                checked[name] = f"unavailable: {exc}"
                continue
            checked[name] = agreement
            built[name] = runtime
            results[key] = agreement.as_dict()
            write_json(results_path, results)
            _log_check(agreement, loaded)
    passing = [a for a in checked.values() if isinstance(a, Agreement) and a.passed and a.speedup > 1.0]
    if requested != "auto":
        passing = [a for a in checked.values() if isinstance(a, Agreement) and a.passed]
    choice = RuntimeChoice(eager, None, checked)
    if passing:
        best = min(passing, key=lambda a: a.network_s / a.eager_network_s)
        try:
            runtime = built.get(best.runtime) or build_runtime(best.runtime, loaded, threads)
            choice = RuntimeChoice(runtime, best, checked)
        except RuntimeUnavailable as exc:
            checked[best.runtime] = f"unavailable: {exc}"
    if requested == "auto":
        for runtime in built.values():
            if runtime is not choice.runtime:
                runtime.clear_cache()
    _log_choice(choice, requested, loaded)
    return choice


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
