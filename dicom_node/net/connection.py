"""What both ends of our DICOM connections do to the socket, receiving or sending."""

from __future__ import annotations

import socket

from pynetdicom.events import Event


def no_delay(event: Event) -> None:
    """Turn Nagle's algorithm off on a new connection (bind to ``evt.EVT_CONN_OPEN``).

    A C-STORE exchange is a request, a small response, the next request: with Nagle on, the small
    PDUs wait for delayed ACKs and intake of 1 MB photos is capped near 60 per second.
    """
    transport = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
