"""The web app over a running node's own objects: its job store, readiness, metrics and model.

The node (:mod:`dicom_node.node`, the wiring) calls :func:`node_app` once its stages have started
and serves the result with :class:`~dicom_node.web.server.HttpServer`. The web side receives what
it shows; it never reaches into the node.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from dicom_node.config import HttpSettings, Peers
from dicom_node.intake.accept import Acceptor
from dicom_node.model.runtime.names import DEFAULT_MAX_RSS_MIB
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.monitor.readiness import Readiness
from dicom_node.queue.store import JobStore
from dicom_node.web.app import create_app
from dicom_node.web.parsing import ParserProvider


def node_app(settings: HttpSettings, model_dir: Path, runtime: str, job_store: JobStore, readiness: Readiness,
             metrics: NodeMetrics, acceptor: Acceptor | None = None, peers: Peers | None = None,
             runtime_max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> FastAPI:
    """The app a started node serves; ``metrics`` is the instance its stages report to. The API's
    own parser loads the node's model on first use, with the workers' runtime choice. With the
    node's ``acceptor`` (and its ``peers``, who may call) it takes photos by STOW-RS too, through
    the same checks, spool and job store as C-STORE."""
    parser = ParserProvider.from_model_dir(model_dir, settings.parse_threads, settings.max_waiting_parses,
                                           runtime=runtime, runtime_max_rss_mib=runtime_max_rss_mib)
    return create_app(parser_provider=parser, job_store=job_store, readiness=readiness, metrics=metrics,
                      settings=settings, acceptor=acceptor, peers=peers)
