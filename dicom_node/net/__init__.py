"""What the DICOM network ends share: named statuses (``status``) and socket set-up
(``connection``). Receiving lives in :mod:`dicom_node.intake`, sending in :mod:`dicom_node.dispatch`."""
