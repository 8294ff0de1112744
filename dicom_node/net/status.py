"""Named DIMSE and association statuses: the flow never carries a bare number.

The codes the node answers with are named here once (PS3.4 Annex B.2.3, Storage Service Class
statuses; PS3.7 Annex C, general statuses; PS3.8 9.3.4, A-ASSOCIATE-RJ result, source and
reason). What a code *means* is pynetdicom's table (``STORAGE_SERVICE_CLASS_STATUS``, the PS3.4
ranges included) and category (``code_to_category``), not a second copy written here.
"""

from __future__ import annotations

from pynetdicom._globals import STATUS_SUCCESS, STATUS_WARNING
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

# C-STORE / C-ECHO response statuses
SUCCESS = 0x0000
# Failure: the SCP could not keep the object (disk or job store). The sender keeps it and retries.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON_GIVEN = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07


def is_success(status: int) -> bool:
    return code_to_category(status) == STATUS_SUCCESS


def is_warning(status: int) -> bool:
    """Warnings mean the object was stored (perhaps coerced): a delivery, not a failure."""
    return code_to_category(status) == STATUS_WARNING


def is_stored(status: int) -> bool:
    """The peer kept the object: success or warning."""
    return is_success(status) or is_warning(status)


def describe(status: int) -> str:
    """``0xA700 (out of resources)`` and the like, for logs, job reasons and the CLI: pynetdicom's
    meaning of the code (its category where it names none), in lower case."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(status, (code_to_category(status), ""))
    meaning = text.removeprefix("Refused: ").removeprefix("Error: ") or category
    return f"0x{status:04X} ({meaning.lower().replace('sop class', 'SOP class')})"


# STOW-RS Failure Reasons (PS3.18 Annex I, Table I.2-2) that C-STORE negotiation makes needless: over
# DICOMweb nothing is negotiated, so an unaccepted SOP class or transfer syntax reaches the checks.
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Referenced SOP Class not supported
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # Referenced Transfer Syntax not supported
PROCESSING_FAILURE = 0x0110  # a general failure in processing the operation
