"""Whether a model is installed, and getting one while the node already runs.

The node starts without its model (offline, or while the weights download): intake and the queue
work as usual, and the workers load the model the moment it appears. Watching is a ``stat`` of the
two files of a model directory, cheap enough for every supervisor tick, and it needs no torch.
The download runs as a child process (``dicom-node model fetch``): modelscope's import and its
download threads stay out of the node's own process, and ``model fetch`` moves the weights into
place before the configuration, so a complete pair is all a watcher can see.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

from dicom_node.logs import fields
from dicom_node.model.names import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

FETCH_STOP_S = 5.0

Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


def model_signature(model_dir: Path) -> Signature | None:
    """(inode, size, mtime) of the configuration and of the weights; None while either is missing.

    A changed signature means someone put new files in place: worth loading again at once instead
    of waiting out the retry interval of a model that failed."""
    parts = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = (model_dir / name).stat()
        except OSError:
            return None
        parts.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return parts[0], parts[1]


def how_to_install(model_dir: Path) -> str:
    """The fix, in the words an administrator can paste (the log, ``/readyz``, the web banner)."""
    return (f"install the weights with `dicom-node model fetch --dir {model_dir}` (needs the ModelScope hub; offline, "
            f"run it on another machine and copy the directory to {model_dir}), or point model_dir "
            f"(DICOM_NODE_MODEL_DIR) at an existing model directory; for tests only, "
            f"`dicom-node model make-test --dir {model_dir}` writes an UNTRAINED model. "
            "No restart is needed: the workers load it as soon as it is there")


def no_model_message(model_dir: Path) -> str:
    return f"no model in {model_dir} (configuration.json and pytorch_model.pt): {how_to_install(model_dir)}"


class BackgroundFetch:
    """``dicom-node model fetch --dir MODEL_DIR`` as a child of the node, logged when it ends.

    Its output (a progress bar on a terminal, a line per 10 % otherwise) goes where the node's
    goes. A failed fetch is not retried by the node: offline it would fail the same way every time;
    the node keeps saying "no model" and how to install one."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        command = [sys.executable, "-m", "dicom_node", "model", "fetch", "--dir", str(self.model_dir)]
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error(fields(event="model.fetch_failed", model_dir=self.model_dir, reason=str(exc)))
            return
        log.info(fields(event="model.fetching", model_dir=self.model_dir, pid=self._process.pid,
                        note="photos are received and queued meanwhile"))
        self._thread = threading.Thread(target=self._wait, name="model-fetch", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        process = self._process
        assert process is not None
        code = process.wait()
        if self._stopping.is_set():
            return
        if code == 0:
            log.info(fields(event="model.fetched", model_dir=self.model_dir,
                            note="the workers load it now"))
        else:
            log.error(fields(event="model.fetch_failed", model_dir=self.model_dir, exit_code=code,
                             note="see the fetch's message above; not retried by the node",
                             fix=how_to_install(self.model_dir)))

    def stop(self) -> None:
        """A stopping node does not leave a download behind (a restarted node starts a new one)."""
        self._stopping.set()
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=FETCH_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=FETCH_STOP_S)
        log.info(fields(event="model.fetch_stopped", model_dir=self.model_dir))
