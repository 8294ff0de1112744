"""Sending: the dispatcher (``dispatcher``: due jobs, retries with persisted backoff) and the
C-STORE / C-ECHO client it, ``dicom-node send`` and ``dicom-node echo`` use (``scu``)."""
