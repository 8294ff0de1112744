"""Serve the app with uvicorn on a background thread, for the node to start and stop with its stages.

The socket is bound here, in the caller's thread, so a port in use fails :meth:`HttpServer.start`
with an ``OSError`` the node can report like its DICOM port, instead of a log line from a thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from dicom_node.logs import fields

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` (port 0: the kernel picks) until :meth:`stop`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            return self.requested_port
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._server and self._server.started)

    def start(self) -> None:
        """Bind, start serving, and return once requests are answered; raises OSError if the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the node's logging set-up applies
            access_log=False,  # the dashboard polls; the API logs what matters itself
            lifespan="on",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        log.info(fields(event="http.listening", address=self.host, port=self.port))

    def stop(self) -> None:
        """Finish the requests in progress (up to a few seconds), then close the port."""
        server, thread, port = self._server, self._thread, self.port
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT_S)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = self._thread = None
        if server is not None:
            log.info(fields(event="http.stopped", port=port))
