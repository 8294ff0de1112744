"""Why the cleaner deleted something: the ``why`` of its log lines and the label of its metrics."""

from __future__ import annotations

from enum import StrEnum


class DeletionReason(StrEnum):
    """Named after the ``[retention]`` key that decided the deletion (``orphan``: no job refers to it)."""

    DONE_AFTER_H = "done_after_h"  # a delivered job's files, that long after it ended
    FAILED_AFTER_H = "failed_after_h"  # a failed job's files, that long after it failed
    MAX_SPOOL_GB = "max_spool_gb"  # a delivered job's files before their time: the spool was over its cap
    ORPHAN = "orphan"  # a file no job refers to (a commit that failed, a crash mid-write)
    BY_HAND = "by_hand"  # `dicom-node jobs purge`
