"""Dispatch: send each job's spooled SEG, SC and SR to its destinations, retrying with backoff.

The retry schedule lives in the job record (``dispatch_attempts``, ``not_before``), not in memory,
so a node restarted in the middle of a PACS outage resumes exactly where it stopped. Each object
delivered to a destination is recorded at once, so a later attempt sends only what is missing,
and the result objects keep their UIDs across attempts: a PACS that did receive an object whose
acknowledgement was lost stores it once. A job gives up only when it has used both
``dispatch.max_attempts`` attempts and ``dispatch.give_up_after_h`` hours since its results were
ready (24 h by default: a PACS down for a maintenance window or a weekend's network change gets its
results afterwards); it then waits in FAILED until a person runs ``dicom-node jobs retry``.

A destination is reached by C-STORE (:mod:`dicom_node.dispatch.scu`) or, with ``kind = "dicomweb"``,
by STOW-RS (:mod:`dicom_node.dispatch.stow`), under the same schedule and the same delivery
records. One difference: a DICOMweb server that refuses the request itself with a 4xx (wrong
credentials, wrong URL) fails the job at once with its reason, since no retry can succeed before
someone changes the configuration; ``dicom-node jobs retry`` sends what is missing afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from dicom_node.config import Destination, DispatchSettings, Peers
from dicom_node.dispatch import stow
from dicom_node.dispatch.scu import AssociationError, Peer, StoreOutcome, store_files
from dicom_node.logs import fields
from dicom_node.monitor.metrics import StageMetrics
from dicom_node.queue.doorbell import Doorbell, IdleWait, join_ringing
from dicom_node.queue.job import Job
from dicom_node.queue.owners import dispatch_owner
from dicom_node.queue.store import JobStore, StaleJobError
from dicom_node.spool.base import Spool

log = logging.getLogger(__name__)


def backoff_delay_s(failed_attempts: int, policy: DispatchSettings) -> float:
    """Wait after the ``failed_attempts``-th failure: initial x factor^(n-1), capped at the maximum."""
    exponent = max(0, failed_attempts - 1)
    try:
        delay = policy.backoff_initial_s * policy.backoff_factor ** exponent
    except OverflowError:
        delay = policy.backoff_max_s
    return min(policy.backoff_max_s, delay)


def dimse_peer(destination: Destination) -> Peer:
    """The C-STORE peer of a ``kind = "dimse"`` destination (its keys are checked by the configuration)."""
    if destination.ae_title is None or destination.host is None or destination.port is None:
        raise ValueError(f"destination {destination.name!r} is not a DIMSE destination (no ae_title, host, port)")
    return Peer(destination.ae_title, destination.host, destination.port, destination.tls,
                destination.ca_certificates, destination.certificate, destination.private_key)


@dataclass(eq=False)
class Dispatcher:
    """``settings.concurrency`` threads sending due jobs.

    ``calling_ae``: the node's AE title, as which results are sent; ``results_ready`` is rung by the
    workers when a job's objects are spooled.
    """

    settings: DispatchSettings
    peers: Peers
    calling_ae: str
    node_id: str
    store: JobStore
    spool: Spool
    metrics: StageMetrics
    results_ready: Doorbell
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False, repr=False)

    def start(self) -> None:
        for destination in self.peers.destinations:
            if destination.is_dicomweb:
                for warning in stow.start_warnings(destination):
                    log.warning(fields(event="dispatch.destination_warning", destination=destination.name,
                                       reason=warning))
        for index in range(self.settings.concurrency):
            owner = dispatch_owner(self.node_id, index)
            thread = threading.Thread(target=self._loop, args=(owner,), name=f"dispatch-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; a send in progress finishes or is abandoned (its lease is released at start)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            join_ringing(thread, self.results_ready, deadline)

    def _loop(self, owner: str) -> None:
        poll_s = self.settings.poll_interval_s
        idle = IdleWait(self.results_ready, poll_s)
        while not self._stop.is_set():
            try:
                job = self.store.claim_for_dispatch(owner, self.settings.lease_s)
            except Exception as exc:
                log.error(fields(event="dispatch.claim_failed", reason=f"{type(exc).__name__}: {exc}"))
                self._stop.wait(max(poll_s, 1.0))
                continue
            if job is None:
                idle.nothing_to_do()
                continue
            idle.found_work()
            try:
                self.dispatch(job, owner)
            except StaleJobError as exc:
                log.warning(fields(event="dispatch.stale_job", job=job.id, reason=str(exc)))
            except Exception:  # never let one job stop the dispatcher
                log.exception(fields(event="dispatch.error", job=job.id))
                try:
                    self._failed(job, owner, ["internal error while sending (see the log)"])
                except Exception:
                    log.exception(fields(event="dispatch.error", job=job.id))

    def dispatch(self, job: Job, owner: str) -> Job:
        """One attempt: send what each destination still lacks, then DONE or schedule the next attempt."""
        errors: list[str] = []
        refused: list[str] = []  # 4xx answers of DICOMweb servers: no retry helps until someone acts
        for name in job.destinations:
            pending = job.pending(name)
            if not pending:
                continue
            try:
                destination = self.peers.destination(name)
            except KeyError:
                errors.append(f"{name}: no destination of that name in the configuration")
                continue

            def delivered(outcome: StoreOutcome, name: str = name) -> None:
                self.store.record_delivery(job.id, owner, name, outcome.sop_instance_uid)

            started = time.perf_counter()
            errors_before = len(errors)
            self.metrics.dispatch_attempt(name)
            paths = [self.spool.path(r.path) for r in pending]
            try:
                if destination.is_dicomweb:
                    outcomes = stow.store_instances(destination, paths, timeout_s=self.settings.timeout_s,
                                                    on_stored=delivered)
                else:
                    outcomes = store_files(dimse_peer(destination), paths, self.calling_ae,
                                           timeout_s=self.settings.timeout_s, on_stored=delivered,
                                           associations=self.settings.associations_per_job)
            except AssociationError as exc:
                errors.append(f"{name}: {exc}")
                self.metrics.dispatch_failure(name)
                continue
            except stow.StowError as exc:
                errors.append(f"{name}: {exc}")
                self.metrics.dispatch_failure(name)
                if exc.permanent:
                    refused.append(f"{name}: {exc}")
                    log.warning(fields(event="dispatch.refused", job=job.id, destination=name,
                                       http_status=exc.http_status, reason=str(exc)))
                continue
            except (OSError, ValueError) as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            failed = [o for o in outcomes if not o.stored]
            if failed:
                errors.append(f"{name}: {len(failed)} of {len(outcomes)} objects not stored ({failed[0].describe()})")
            else:
                log.info(fields(event="dispatch.sent", job=job.id, destination=name, objects=len(outcomes),
                                seconds=f"{time.perf_counter() - started:.3f}"))
            if len(errors) > errors_before:
                self.metrics.dispatch_failure(name)
        if not errors:
            return self.store.dispatch_succeeded(job.id, owner)
        if refused:
            reason = (f"refused: {'; '.join(errors)}. Fix the destination (configuration, credentials) or the "
                      f"server, then run `dicom-node jobs retry {job.id}`")
            return self.store.dispatch_failed(job.id, owner, reason, None)
        return self._failed(job, owner, errors)

    def _failed(self, job: Job, owner: str, errors: list[str]) -> Job:
        policy = self.settings
        attempt = job.dispatch_attempts + 1
        what = "; ".join(errors)
        now = time.time()
        since = job.dispatching_since if job.dispatching_since is not None else job.updated_at
        trying_h = max(0.0, now - since) / 3600
        if attempt >= policy.max_attempts and trying_h >= policy.give_up_after_h:
            reason = (f"gave up after {attempt} dispatch attempts over {trying_h:.1f} h: {what}. "
                      f"Run `dicom-node jobs retry {job.id}` once the destination works")
            return self.store.dispatch_failed(job.id, owner, reason, None)
        delay = backoff_delay_s(attempt, policy)
        reason = (f"dispatch attempt {attempt} failed: {what}; next attempt in {delay:.1f} s (gives up after "
                  f"{policy.max_attempts} attempts and {policy.give_up_after_h:g} h)")
        return self.store.dispatch_failed(job.id, owner, reason, now + delay)
