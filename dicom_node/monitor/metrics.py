"""Prometheus metrics of the node, served at ``/metrics``.

Two kinds of figures:

* events the stages report as they happen, through :class:`StageMetrics` (an instance received
  or rejected, a dispatch attempt or failure, a parse's duration, files the cleaner deleted); a stage
  always has one, the :class:`NullMetrics` where nothing is scraped (tests, the CLI), so it never
  asks whether to count;
* states read from the job store at scrape time (jobs per state, queue depth), so they are right
  whichever process moved the job and survive a restart of the node.

Each :class:`NodeMetrics` has its own registry: two nodes (or two tests) in one process never mix
their counts. Label values are fixed words or configured names, never patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from dicom_node.logs import fields
from dicom_node.queue.job import JobState
from dicom_node.queue.store import JobStore
from dicom_node.retention.reasons import DeletionReason

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
NAMESPACE = "dicom_node"

# Where a photo came from: a C-STORE to the DICOM port, or an upload to the REST API / web UI.
SOURCE_DICOM = "dicom"
SOURCE_API = "api"
SOURCE_DICOMWEB = "dicomweb"  # a photo stored by STOW-RS (POST /dicom-web/studies)

# Why a worker process ended while the node ran (dicom_node_worker_exits_total{reason}).
WORKER_DIED = "died"  # crashed or killed: its job went back to the queue, charged as an attempt
WORKER_RECYCLED = "recycled"  # outgrew [worker] recycle_rss_mib after a photo and was replaced
WORKER_NO_MODEL = "no_model"  # could not load the model
WORKER_EXIT_REASONS = (WORKER_DIED, WORKER_RECYCLED, WORKER_NO_MODEL)

# CPU parses of one photo take from a fraction of a second (tiny test model) to minutes (large photo,
# full model, one busy core).
PARSE_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, float("inf"))

# Jobs waiting for each stage (the queue depth a scaling decision looks at).
_WAITING_FOR = {
    "processing": (JobState.RECEIVED, JobState.PARSING, JobState.ENCODING),
    "dispatch": (JobState.DISPATCHING,),
}


class _JobStoreCollector(Collector):
    """Jobs per state and queue depth, counted in the job store at each scrape."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.counts()
        except Exception as exc:  # a broken store must not break the scrape: /readyz reports it
            log.warning(fields(event="metrics.job_store_unreadable", reason=f"{type(exc).__name__}: {exc}"))
            return
        jobs = GaugeMetricFamily(f"{NAMESPACE}_jobs", "Jobs in the job store, by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        depth = GaugeMetricFamily(f"{NAMESPACE}_queue_depth", "Jobs waiting for a stage (processing or dispatch)",
                                  labels=["stage"])
        for stage, states in _WAITING_FOR.items():
            depth.add_metric([stage], sum(counts.get(s, 0) for s in states))
        yield depth


class StageMetrics(Protocol):
    """What intake, the worker pool, dispatch and the cleaner report (implemented by :class:`NodeMetrics`)."""

    def received(self, source: str = SOURCE_DICOM) -> None: ...
    def rejected(self, reason: str, source: str = SOURCE_DICOM) -> None: ...
    def dispatch_attempt(self, destination: str) -> None: ...
    def dispatch_failure(self, destination: str) -> None: ...
    def observe_parse(self, seconds: float, source: str = SOURCE_DICOM) -> None: ...
    def retention_deleted(self, why: str, files: int, nbytes: int) -> None: ...
    def retention_forgotten(self, jobs: int) -> None: ...
    def retention_error(self) -> None: ...
    def spool_size(self, nbytes: int) -> None: ...
    def worker_exited(self, reason: str) -> None: ...


class NullMetrics:
    """Counts nothing: for a stage run where no registry is scraped."""

    def received(self, source: str = SOURCE_DICOM) -> None:
        pass

    def rejected(self, reason: str, source: str = SOURCE_DICOM) -> None:
        pass

    def dispatch_attempt(self, destination: str) -> None:
        pass

    def dispatch_failure(self, destination: str) -> None:
        pass

    def observe_parse(self, seconds: float, source: str = SOURCE_DICOM) -> None:
        pass

    def retention_deleted(self, why: str, files: int, nbytes: int) -> None:
        pass

    def retention_forgotten(self, jobs: int) -> None:
        pass

    def retention_error(self) -> None:
        pass

    def spool_size(self, nbytes: int) -> None:
        pass

    def worker_exited(self, reason: str) -> None:
        pass


class NodeMetrics:
    """The node's metrics registry and the calls that move its counters.

    The node calls :meth:`received` / :meth:`rejected` from intake, :meth:`dispatch_attempt` /
    :meth:`dispatch_failure` from dispatch, :meth:`observe_parse` when a parse finishes, and
    :meth:`count_open_associations` once with a function that counts them.
    """

    def __init__(self, job_store: JobStore | None = None, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "instances_received", "Photos received (acknowledged C-STOREs and API uploads)", ["source"],
            namespace=NAMESPACE, registry=r)
        self.instances_rejected = Counter(
            "instances_rejected", "Photos or associations refused, by reason", ["source", "reason"],
            namespace=NAMESPACE, registry=r)
        self.dispatch_attempts = Counter(
            "dispatch_attempts", "Attempts to send a job's results to a destination", ["destination"],
            namespace=NAMESPACE, registry=r)
        self.dispatch_failures = Counter(
            "dispatch_failures", "Dispatch attempts that did not deliver everything", ["destination"],
            namespace=NAMESPACE, registry=r)
        self.parse_seconds = Histogram(
            "parse_seconds", "Time to parse one photo (decode to label map)", ["source"],
            namespace=NAMESPACE, registry=r, buckets=PARSE_SECONDS_BUCKETS)
        self.open_associations = Gauge(
            "open_associations", "DICOM associations open on the intake port", namespace=NAMESPACE, registry=r)
        self.retention_deleted_files = Counter(
            "retention_deleted_files", "Spooled files deleted by the cleaner, by the rule that decided it", ["why"],
            namespace=NAMESPACE, registry=r)
        self.retention_deleted_bytes = Counter(
            "retention_deleted_bytes", "Bytes of spooled files deleted by the cleaner, by the rule that decided it",
            ["why"], namespace=NAMESPACE, registry=r)
        self.retention_forgotten_jobs = Counter(
            "retention_forgotten_jobs", "Job records (with results, deliveries and history) deleted by the cleaner",
            namespace=NAMESPACE, registry=r)
        self.retention_errors = Counter(
            "retention_errors", "Cleaner runs or deletions that failed (retried at the next run)",
            namespace=NAMESPACE, registry=r)
        self.spool_bytes = Gauge(
            "spool_bytes", "Bytes in the spool (photos and results) at the cleaner's last run",
            namespace=NAMESPACE, registry=r)
        self.worker_exits = Counter(
            "worker_exits", "Worker processes that ended while the node ran, by reason (died, recycled, no_model)",
            ["reason"], namespace=NAMESPACE, registry=r)
        # Known label values start at 0 so a dashboard shows them before the first event.
        for reason in WORKER_EXIT_REASONS:
            self.worker_exits.labels(reason)
        for source in (SOURCE_DICOM, SOURCE_API):
            self.instances_received.labels(source)
            self.parse_seconds.labels(source)
        self.instances_received.labels(SOURCE_DICOMWEB)
        for why in DeletionReason:
            self.retention_deleted_files.labels(why.value)
            self.retention_deleted_bytes.labels(why.value)
        if job_store is not None:
            r.register(_JobStoreCollector(job_store))
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # ------------------------------------------------------------------ the node's calls

    def received(self, source: str = SOURCE_DICOM) -> None:
        """A photo was accepted (a C-STORE answered with success, or an API upload read)."""
        self.instances_received.labels(source).inc()

    def rejected(self, reason: str, source: str = SOURCE_DICOM) -> None:
        """A photo or an association was refused; ``reason`` is a short fixed word (``too_large``)."""
        self.instances_rejected.labels(source, reason).inc()

    def dispatch_attempt(self, destination: str) -> None:
        self.dispatch_attempts.labels(destination).inc()

    def dispatch_failure(self, destination: str) -> None:
        self.dispatch_failures.labels(destination).inc()

    def observe_parse(self, seconds: float, source: str = SOURCE_DICOM) -> None:
        self.parse_seconds.labels(source).observe(seconds)

    def retention_deleted(self, why: str, files: int, nbytes: int) -> None:
        """The cleaner deleted ``files`` files of ``nbytes`` bytes; ``why`` is a :class:`DeletionReason`."""
        self.retention_deleted_files.labels(why).inc(files)
        self.retention_deleted_bytes.labels(why).inc(nbytes)

    def retention_forgotten(self, jobs: int) -> None:
        self.retention_forgotten_jobs.inc(jobs)

    def retention_error(self) -> None:
        self.retention_errors.inc()

    def spool_size(self, nbytes: int) -> None:
        self.spool_bytes.set(nbytes)

    def worker_exited(self, reason: str) -> None:
        """A worker process ended while the node was not stopping; ``reason`` is one of
        :data:`WORKER_EXIT_REASONS`."""
        self.worker_exits.labels(reason).inc()

    def count_open_associations(self, count: Callable[[], int]) -> None:
        """Read the open associations from ``count`` at each scrape (e.g. ``len(ae.active_associations)``)."""
        self.open_associations.set_function(lambda: float(count()))

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
