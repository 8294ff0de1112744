"""Telling systemd how the node is doing (``Type=notify``, sd_notify(3)).

Written by hand: the protocol is one datagram to the socket named in ``$NOTIFY_SOCKET``, and the
only library for it (python-systemd) is a C extension that needs libsystemd headers to build. Off
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``); True when a manager received it."""
    address = os.environ.get(NOTIFY_SOCKET_ENV)
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket (sd_notify(3))
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:  # the manager went away: the node goes on, systemd will see it anyway
        log.warning("cannot notify the service manager at %s: %s", os.environ.get(NOTIFY_SOCKET_ENV), exc)
        return False
    return True
