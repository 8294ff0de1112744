"""The spool: received photos and encoded results on durable storage between the stages.

``base`` is the interface the stages use, ``local`` the directory on this node's disk (the
default), ``atomic`` the durable, all-or-nothing file write underneath both and the health file.
"""

from dicom_node.spool.atomic import atomic_write
from dicom_node.spool.base import Spool
from dicom_node.spool.local import LocalSpool

__all__ = ["LocalSpool", "Spool", "atomic_write"]
