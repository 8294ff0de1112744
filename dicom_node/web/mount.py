"""The web app over a running node's own objects: its job store, health, intake and model directory.

The node calls :func:`app_for_node` after its stages have started and serves the result with
:class:`~dicom_node.web.server.HttpServer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from dicom_node.web.app import create_app
from dicom_node.web.metrics import NodeMetrics
from dicom_node.web.parsing import ParserProvider
from dicom_node.web.readiness import node_readiness
from dicom_node.web.settings import HttpSettings

if TYPE_CHECKING:
    from dicom_node.node import Node


def node_metrics(node: Node) -> NodeMetrics:
    """Metrics reading the node's job store and counting its open DICOM associations."""
    metrics = NodeMetrics(job_store=node.store)

    def open_associations() -> int:
        intake = node.intake
        return len(intake.ae.active_associations) if intake is not None else 0

    metrics.count_open_associations(open_associations)
    return metrics


def app_for_node(node: Node, settings: HttpSettings, metrics: NodeMetrics | None = None) -> FastAPI:
    """The app a started node serves; ``metrics`` is the instance its stages report to."""
    parser = ParserProvider.from_model_dir(node.config.model_dir, settings.parse_threads,
                                           settings.max_waiting_parses, runtime=node.config.worker.runtime)
    return create_app(
        parser_provider=parser,
        job_store=node.store,
        readiness=node_readiness(node, settings),
        metrics=metrics if metrics is not None else node_metrics(node),
        settings=settings,
    )
