"""The worker pool: it says loudly when photos are queued that no worker will process."""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.monitor.health import Health
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.node import worker_setup
from dicom_node.pipeline.supervisor import PROBLEM_WORKERS, WorkerPool
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.sqlite_store import SqliteJobStore


def test_no_workers_means_not_ready(tmp_path: Path) -> None:
    config = NodeConfig(node_id="n", data_dir=tmp_path, worker={"count": 0})
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    health = Health(tmp_path / "health.json")
    pool = WorkerPool(worker_setup(config), config.node_id, store, health, NullMetrics(), new_doorbells())
    pool.start()
    try:
        assert not health.ready and "worker.count is 0" in health.problems[PROBLEM_WORKERS]
    finally:
        pool.stop()
        store.close()
