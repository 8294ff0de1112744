"""The API's parser: one HumanParser for the web process, loaded once, running one photo at a time.

The node's workers parse received photos in their own processes; uploads to the API are parsed
here, in the process that serves HTTP. One parse at a time keeps a burst of uploads from taking
every core from the workers, and a short waiting line (``max_waiting``) answers the rest with
503 instead of piling threads and decoded photos up in memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.decode.photo import Photo
from dicom_node.logs import fields
from dicom_node.model.presence import Signature, model_signature, no_model_message
from dicom_node.model.runtime.names import DEFAULT_MAX_RSS_MIB, RuntimeName
from dicom_node.monitor.readiness import Check, CheckResult
from dicom_node.parse.engine import HumanParser
from dicom_node.parse.render import color_label_map, overlay, to_png_bytes
from dicom_node.parse.report import parse_report
from dicom_node.parse.result import ParsingResult

log = logging.getLogger(__name__)

LOAD_RETRY_S = 30.0  # a model that failed to load is tried again after this long, not on every request


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded; the message says why."""


class ParserBusyError(RuntimeError):
    """One parse is running and the waiting line is full."""


class ParserProvider:
    """Loads the parser on first use (or at :meth:`warm_up`) and runs parses one at a time."""

    def __init__(self, load: Callable[[], HumanParser], max_waiting: int = 4,
                 model_dir: Path | None = None) -> None:
        """``model_dir``, when given, is watched: a model missing at the last try is tried again as
        soon as its files appear, not ``LOAD_RETRY_S`` later."""
        self._load = load
        self._model_dir = model_dir
        self._failed_on: Signature | None = None
        self._parser: HumanParser | None = None
        self._load_lock = threading.Lock()
        self._load_error: tuple[float, str] | None = None
        self._parse_lock = threading.Lock()
        self._admitted = threading.BoundedSemaphore(1 + max_waiting)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, threads: int = 0, max_waiting: int = 4,
                       runtime: str = RuntimeName.AUTO,
                       runtime_max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> ParserProvider:
        torch_threads = threads or max(1, (os.cpu_count() or 2) // 2)
        return cls(lambda: HumanParser.from_model_dir(model_dir, torch_threads, runtime=runtime,
                                                      runtime_max_rss_mib=runtime_max_rss_mib), max_waiting,
                   model_dir=Path(model_dir))

    @classmethod
    def of(cls, parser: HumanParser, max_waiting: int = 4) -> ParserProvider:
        provider = cls(lambda: parser, max_waiting)
        provider._parser = parser
        return provider

    @property
    def loaded(self) -> HumanParser | None:
        return self._parser

    def get(self) -> HumanParser:
        """The parser, loading it now if needed; raises :class:`ModelUnavailableError`."""
        parser = self._parser
        if parser is not None:
            return parser
        with self._load_lock:
            if self._parser is not None:
                return self._parser
            files = model_signature(self._model_dir) if self._model_dir is not None else None
            if self._model_dir is not None and files is None:
                raise ModelUnavailableError(no_model_message(self._model_dir))
            if (self._load_error is not None and time.monotonic() - self._load_error[0] < LOAD_RETRY_S
                    and files == self._failed_on):
                raise ModelUnavailableError(self._load_error[1])
            try:
                self._parser = self._load()
            except Exception as exc:
                self._failed_on = files
                message = f"the model cannot be loaded: {type(exc).__name__}: {exc}"
                self._load_error = (time.monotonic(), message)
                log.error(fields(event="http.model_unavailable", reason=message))
                raise ModelUnavailableError(message) from exc
            self._load_error = None
            return self._parser

    def warm_up(self) -> threading.Thread:
        """Load the model in the background so the first upload does not wait for it."""

        def load() -> None:
            try:
                self.get()
            except ModelUnavailableError:
                pass  # logged; the API answers 503 and tries again later

        thread = threading.Thread(target=load, name="http-model-load", daemon=True)
        thread.start()
        return thread

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """A place in the line (running or waiting), or :class:`ParserBusyError` when it is full."""
        if not self._admitted.acquire(blocking=False):
            raise ParserBusyError("the node is busy parsing other photos; try again in a moment")
        try:
            yield
        finally:
            self._admitted.release()

    @contextmanager
    def exclusive(self) -> Iterator[HumanParser]:
        """The parser, held by this caller alone."""
        parser = self.get()
        with self._parse_lock:
            yield parser


def parser_model_check(provider: ParserProvider) -> Check:
    """The API's own parser has its model (loaded now if it was not yet)."""

    def check() -> CheckResult:
        parser = provider.get()
        untrained = " (UNTRAINED test model)" if parser.untrained else ""
        return CheckResult(True, f"model {parser.model_digest[:16]} loaded{untrained}")

    return check


@dataclass(frozen=True)
class Prediction:
    result: ParsingResult
    report: dict[str, Any]  # parse_report(): the JSON the CLI writes
    metadata: dict[str, Any]  # the summary sent in the X-Parse-Metadata header
    color_png: bytes
    overlay_png: bytes
    original_png: bytes | None
    parse_s: float


def prediction_metadata(report: dict[str, Any]) -> dict[str, Any]:
    """What a client needs without opening the images: the figures of :func:`parse_report`, shortened."""
    metadata = {
        "status": "ok",
        "source": report["source"],
        "image_size": report["image_size"],
        "inference_s": report["timings_s"].get("total"),
        "person_count": report["person_count"],
        "labels_present": [region["label"] for region in report["regions"]],
        "regions": report["regions"],
        "model": report["model"],
    }
    if "warning" in report:
        metadata["warning"] = report["warning"]
    return metadata


def predict(parser: HumanParser, photo: Photo, include_original: bool = False) -> Prediction:
    """Parse one decoded photo and render what the API returns."""
    result = parser.parse(photo.rgb)
    report = parse_report(result, photo.source)
    color_png = to_png_bytes(color_label_map(result.label_map))
    overlay_png = to_png_bytes(overlay(photo.rgb, result.label_map, class_names=result.class_names))
    original_png = to_png_bytes(photo.rgb) if include_original else None
    return Prediction(result, report, prediction_metadata(report), color_png, overlay_png, original_png,
                      float(result.timings_s.get("total", 0.0)))
