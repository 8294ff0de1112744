"""Who holds a job: owner names, assembled here and nowhere else.

An owner name is ``<node_id>/<role>-<numbers>/``. The job store releases a gone holder's jobs by
*prefix* (``release_owner``), so the shape is a contract: ``<node_id>/`` is every holder of one
node (recovery at start), ``<node_id>/worker-3-2/`` one worker process (slot 3, second start).
The closing ``/`` keeps ``worker-1-1/`` from matching ``worker-1-10/``.
"""

from __future__ import annotations

from enum import StrEnum


class OwnerRole(StrEnum):
    WORKER = "worker"  # a worker process: holds PARSING / ENCODING jobs
    DISPATCH = "dispatch"  # a dispatch thread: leases DISPATCHING jobs


def node_owners(node_id: str) -> str:
    """The prefix of every owner name of one node."""
    return f"{node_id}/"


def worker_owner(node_id: str, slot: int, generation: int) -> str:
    """One start of one worker slot: a restarted worker never inherits its predecessor's jobs."""
    return f"{node_owners(node_id)}{OwnerRole.WORKER}-{slot}-{generation}/"


def dispatch_owner(node_id: str, index: int) -> str:
    return f"{node_owners(node_id)}{OwnerRole.DISPATCH}-{index}/"
