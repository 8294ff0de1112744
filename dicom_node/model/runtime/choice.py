"""The choice of a runtime by measurement: ``auto`` checks every candidate against the eager
reference on the parity fixture's images (:mod:`.agreement`) and uses the fastest one that passes
and beats eager by ``MIN_SPEEDUP``, else the reference. The check runs once per model, machine and
package versions, in a process of its own (:mod:`.check`); its result is kept beside the model and
every start logs the choice and the measured agreement.
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

from dicom_node.logs import fields
from dicom_node.model.checkpoint import LoadedModel
from dicom_node.model.runtime.agreement import RULE_VERSION, Agreement
from dicom_node.model.runtime.base import NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import cache_dir_for, locked, machine_signature, read_json
from dicom_node.model.runtime.cpu import native_bf16_refusal
from dicom_node.model.runtime.eager import EagerRuntime
from dicom_node.model.runtime.names import (
    CANDIDATES,
    DEFAULT_MAX_RSS_MIB,
    NEEDS_NATIVE_BF16,
    NETWORK_REVISION,
    REVISIONS,
    RUNTIME_CHOICES,
    RuntimeName,
)
from dicom_node.model.runtime.registry import build_runtime

log = logging.getLogger(__name__)

# ``auto`` takes a candidate only if it beat eager by this much in the same measurement: less is
# within this machine's run-to-run noise (15-25 %) and not worth a graph export and its disk.
MIN_SPEEDUP = 1.10


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


# Raised when what the check records changes. 2: resident peaks (Agreement.peak_rss_mib), without
# which ``auto`` takes no candidate, so results recorded before are measured again.
RECORD_REVISION = 2


def check_key(name: str, threads: int | None) -> str:
    """What a check result depends on: a result measured under another network or runtime
    revision, rule, record, thread count, package version or CPU is measured again."""
    return (f"{name} rev={REVISIONS.get(RuntimeName(name), 1)} net={NETWORK_REVISION} rule={RULE_VERSION}"
            f" rec={RECORD_REVISION} threads={threads or torch.get_num_threads()} {_versions()}"
            f" cpu={machine_signature()}")


def cpu_refusal(name: str) -> str | None:
    """Why this CPU does not run ``name`` at all (not even its check), or None."""
    if name in NEEDS_NATIVE_BF16:
        return native_bf16_refusal()
    return None


def choose_runtime(requested: str, loaded: LoadedModel, threads: int | None = None,
                   candidates: tuple[str, ...] = CANDIDATES, max_rss_mib: float = DEFAULT_MAX_RSS_MIB
                   ) -> RuntimeChoice:
    """The runtime to parse with: ``eager``, a named candidate (used only if it passes its
    check), or ``auto`` (the fastest candidate that passes, beats eager by ``MIN_SPEEDUP`` and
    fits ``max_rss_mib`` (:func:`fits_memory`), else eager)."""
    if requested not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIME_CHOICES)}")
    eager = EagerRuntime(loaded.model)
    if requested == RuntimeName.EAGER:
        choice = RuntimeChoice(eager, None)
        _log_choice(choice, requested, loaded)
        return choice
    wanted = candidates if requested == "auto" else (requested,)
    refused = {name: f"unavailable: {reason}" for name in wanted if (reason := cpu_refusal(name))}
    names = tuple(name for name in wanted if name not in refused)
    cache = cache_dir_for(loaded.model_dir, loaded.digest)
    results_path = cache / f"agreement-{loaded.digest[:16]}.json"
    keys = {name: check_key(name, threads) for name in names}
    with locked(cache, "agreement"):  # one process measures; the others read its results
        missing = [name for name in names if keys[name] not in read_json(results_path)]
        failure = (_check_in_child(loaded, missing, threads, requested, results_path, max_rss_mib)
                   if missing else None)
        results = read_json(results_path)
    checked: dict[str, Agreement | str] = {}
    for name in wanted:
        if name in refused:
            checked[name] = refused[name]
        elif keys[name] in results:
            agreement = checked[name] = Agreement(**results[keys[name]])
            if name in missing:
                _log_check(agreement, loaded)
        else:
            checked[name] = failure or "unavailable: not checked"
    choice = RuntimeChoice(eager, None, checked)
    best = best_candidate(checked, requested, max_rss_mib)
    if best is not None:
        try:
            choice = RuntimeChoice(build_runtime(best.runtime, loaded, threads), best, checked)
        except RuntimeUnavailable as exc:
            checked[best.runtime] = f"unavailable: {exc}"
    _log_choice(choice, requested, loaded, max_rss_mib)
    return choice


def best_candidate(checked: dict[str, Agreement | str], requested: str,
                   max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> Agreement | None:
    """The passing candidate to use: for ``auto`` only one clearly faster than eager that fits
    the memory (a runtime named explicitly is the administrator's choice, memory included)."""
    passing = [a for a in checked.values() if isinstance(a, Agreement) and a.passed]
    if requested == RuntimeName.AUTO:
        passing = [a for a in auto_eligible(passing) if fits_memory(a, max_rss_mib)]
    return min(passing, key=lambda a: a.network_s / a.eager_network_s) if passing else None


def auto_eligible(agreements: list[Agreement]) -> list[Agreement]:
    """The candidates ``auto`` could take on speed and agreement: passed and beat eager by the margin."""
    return [a for a in agreements if a.passed and a.speedup >= MIN_SPEEDUP]


def fits_memory(agreement: Agreement, max_rss_mib: float) -> bool:
    """Whether a worker running this candidate stays within ``max_rss_mib`` or eager's own peak,
    whichever is larger; an unmeasured peak does not fit."""
    if agreement.peak_rss_mib is None or agreement.eager_peak_rss_mib is None:
        return False
    return agreement.peak_rss_mib <= max(max_rss_mib, agreement.eager_peak_rss_mib)


def _check_in_child(loaded: LoadedModel, names: list[str], threads: int | None, requested: str,
                    results_path: Path, max_rss_mib: float) -> str | None:
    """Run the checks in a fresh process (:mod:`.check`); None, or why they could not run.

    Exporting and checking the full model peaks near 6 GiB, and a parsing process keeps its
    high-water mark (:mod:`dicom_node.allocator`): done here, a worker would hold that memory
    for ever. A plain subprocess, because node workers are daemonic and may not fork children of
    their own through multiprocessing. It logs to our stderr and writes ``results_path``.
    """
    job = {"model_dir": str(loaded.model_dir), "names": names, "threads": threads, "requested": requested,
           "results_path": str(results_path), "keys": {n: check_key(n, threads) for n in names},
           "max_rss_mib": max_rss_mib,
           "log_level": logging.getLogger().getEffectiveLevel()}
    done = subprocess.run([sys.executable, "-m", "dicom_node.model.runtime.check", json.dumps(job)], check=False)
    if done.returncode != 0:
        return f"unavailable: the check process failed (exit code {done.returncode})"
    return None


def _log_check(agreement: Agreement, loaded: LoadedModel) -> None:
    log.info(fields(event="runtime.checked", runtime=agreement.runtime, passed=agreement.passed,
                    passed_issue5=agreement.passed_issue5, label_agreement=f"{agreement.label_agreement:.5f}",
                    unmatched_instances=agreement.unmatched_fp32, added_instances=agreement.unmatched_other,
                    fp32_instances=agreement.fp32_instances, class_share_pp=f"{agreement.class_share_pp:.3f}",
                    person_count_diff=agreement.person_count_diff, lost_by_query=agreement.lost_by_query,
                    min_iou_by_query=f"{agreement.min_iou_by_query:.4f}",
                    network_s=f"{agreement.network_s:.3f}", eager_network_s=f"{agreement.eager_network_s:.3f}",
                    export_s=None if agreement.export_s is None else f"{agreement.export_s:.1f}",
                    model=loaded.digest[:16]))


def _verdict(result: Agreement | str, requested: str, max_rss_mib: float) -> str:
    if not isinstance(result, Agreement) or not result.passed:
        return "rejected"
    if requested == RuntimeName.AUTO and auto_eligible([result]) and not fits_memory(result, max_rss_mib):
        return f"passed, but needs more memory than {max_rss_mib:.0f} MiB or eager's (worker.runtime_max_rss_mib)"
    return "passed"


def _log_choice(choice: RuntimeChoice, requested: str, loaded: LoadedModel,
                max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> None:
    others = "; ".join(f"{name}: {_verdict(r, requested, max_rss_mib)} "
                       f"({r.summary() if isinstance(r, Agreement) else r})" for name, r in choice.checked.items()
                       if name != choice.runtime.name)
    log.info(fields(event="runtime.selected", requested=requested, runtime=choice.runtime.name,
                    agreement=choice.summary(), others=others or None, model=loaded.digest[:16]))
    if requested not in (RuntimeName.AUTO, RuntimeName.EAGER) and choice.runtime.name != requested:
        log.warning(fields(event="runtime.refused", requested=requested, runtime=choice.runtime.name,
                           reason=str(choice.checked.get(requested, "not checked"))))
