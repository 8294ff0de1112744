"""``dicom-node check``: is this installation ready to receive, parse and send back photos?

One place that asks every question an administrator would ask before the first photo (is the
configuration valid, is the model there and the real one, is there room on disk, can the node
listen, do the destinations answer, are the certificates good, does the PACS rule point here)
and answers each with ok / warn / fail and what to do. Only the CLI imports this room; it imports
the stages' own code so that its answers are the node's.
"""

from dicom_node.checkup.checks import check_installation
from dicom_node.checkup.result import CheckRow, Status, exit_status

__all__ = ["CheckRow", "Status", "check_installation", "exit_status"]
