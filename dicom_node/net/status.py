"""Named DIMSE and association statuses: the flow never carries a bare number.

Meanings from PS3.4 Annex B.2.3 (Storage Service Class statuses), PS3.7 Annex C (general
statuses) and PS3.8 9.3.4 (A-ASSOCIATE-RJ result, source and reason).
"""

from __future__ import annotations

# C-STORE / C-ECHO response statuses
SUCCESS = 0x0000
# Failure: the SCP could not keep the object (disk or job store). The sender keeps it and retries.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007

_WARNING_STATUSES = frozenset({WARNING_COERCION_OF_DATA_ELEMENTS, WARNING_ELEMENTS_DISCARDED,
                               WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS, 0x0001})

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON_GIVEN = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07


def is_success(status: int) -> bool:
    return status == SUCCESS


def is_warning(status: int) -> bool:
    """Warnings mean the object was stored (perhaps coerced): a delivery, not a failure."""
    return status in _WARNING_STATUSES or 0xB000 <= status <= 0xBFFF


def is_stored(status: int) -> bool:
    """The peer kept the object: success or warning."""
    return is_success(status) or is_warning(status)


def describe(status: int) -> str:
    """``0xA700 (out of resources)`` and the like, for logs and job reasons."""
    if status == SUCCESS:
        name = "success"
    elif 0xA700 <= status <= 0xA7FF:
        name = "out of resources"
    elif 0xA900 <= status <= 0xA9FF:
        name = "data set does not match SOP class"
    elif 0xC000 <= status <= 0xCFFF:
        name = "cannot understand"
    elif is_warning(status):
        name = "warning"
    elif status == 0x0122:
        name = "SOP class not supported"
    elif status == 0x0124:
        name = "not authorised"
    elif status == 0x0211:
        name = "unrecognised operation"
    else:
        name = "failure"
    return f"0x{status:04X} ({name})"
