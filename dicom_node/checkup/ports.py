"""Can the node listen where it is configured to? Free, or held by the node that already runs here.

The test is the real one: bind the address and port as the node's servers do (``SO_REUSEADDR``,
so a port in TIME_WAIT after a restart counts as free, as it does for the node). A port in use is
fine when the process holding it is the node itself: its pid is in ``<data_dir>/health.json``,
and Linux's ``/proc`` says which process owns the listening socket.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from dicom_node.monitor.health import read_health

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


@dataclass(frozen=True)
class PortState:
    """``free``; else ``holder_pid`` when the running node holds it, else ``problem`` in words."""

    free: bool
    holder_pid: int | None = None
    problem: str | None = None


def _bind_family(address: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (any address), from /proc/net/tcp and tcp6."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _LISTEN and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def _holds(pid: int, inodes: set[str]) -> bool:
    """Whether process ``pid`` has one of these sockets open."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) in wanted:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def running_node_pid(health_path: Path) -> int | None:
    """The pid in the node's health file, if that process is alive."""
    health = read_health(health_path)
    pid = health.get("pid") if isinstance(health, dict) else None
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid


def port_state(address: str, port: int, health_path: Path) -> PortState:
    """Whether the node could listen on ``address``:``port`` now."""
    try:
        family, sockaddr = _bind_family(address, port)
    except OSError as exc:
        return PortState(False, problem=f"{address} does not resolve: {exc.strerror or exc}")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
            probe.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                pid = running_node_pid(health_path)
                if pid is not None and _holds(pid, _listening_inodes(port)):
                    return PortState(False, holder_pid=pid)
                return PortState(False, problem="in use by another process")
            if exc.errno == errno.EADDRNOTAVAIL:
                return PortState(False, problem=f"{address} is not an address of this machine")
            if exc.errno == errno.EACCES:
                return PortState(False, problem="permission denied (ports below 1024 need root or "
                                                "CAP_NET_BIND_SERVICE)")
            return PortState(False, problem=exc.strerror or str(exc))
    return PortState(True)
