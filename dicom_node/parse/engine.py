"""The parsing engine: a loaded M2FP turned into a function from an RGB photo to a ParsingResult.

The model is loaded once and reused for every photo; thread count is set here so several
engines (or jobs) in one process do not oversubscribe the CPU. The network runs on the runtime
:func:`~dicom_node.model.runtime.choose_runtime` picks (``auto``: the fastest that gives the
eager fp32 answer on the parity images); pre- and post-processing are the same for all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.allocator import keep_freed_memory
from dicom_node.model.checkpoint import LoadedModel, load_model_dir
from dicom_node.model.names import PostprocessMode
from dicom_node.model.postprocess import LazyMask, PostprocessOutput, postprocess, postprocess_lowres
from dicom_node.model.preprocess import prepare_image
from dicom_node.model.runtime.choice import RuntimeChoice, choose_runtime
from dicom_node.model.runtime.names import DEFAULT_MAX_RSS_MIB, RuntimeName
from dicom_node.parse.result import ParsingResult, PartInstance, PersonInstance

log = logging.getLogger(__name__)

POSTPROCESS_MODES = {PostprocessMode.EXACT: postprocess, PostprocessMode.FAST: postprocess_lowres}


class HumanParser:
    """Runs M2FP multi-person human parsing on RGB photos."""

    def __init__(self, loaded: LoadedModel, threads: int | None = None,
                 postprocess_mode: str = PostprocessMode.EXACT, runtime: str = RuntimeName.AUTO,
                 runtime_max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> None:
        """``postprocess_mode``: "exact" (the official semantics at the photo's size) or "fast"
        (scores and label map at the network-input size; see ``postprocess_lowres``).
        ``runtime``: "auto", "eager" or a candidate of :mod:`dicom_node.model.runtime`;
        ``runtime_max_rss_mib``: the memory ``auto`` may use (:func:`~dicom_node.model.runtime.choice.fits_memory`)."""
        if postprocess_mode not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess_mode must be one of {sorted(POSTPROCESS_MODES)}, got {postprocess_mode!r}")
        self._postprocess = POSTPROCESS_MODES[PostprocessMode(postprocess_mode)]
        self.postprocess_mode = postprocess_mode
        self.loaded = loaded
        keep_freed_memory()
        loaded.model.prepare_for_inference()
        if threads:
            torch.set_num_threads(threads)
        self.runtime_choice: RuntimeChoice = choose_runtime(runtime, loaded, threads,
                                                            max_rss_mib=runtime_max_rss_mib)
        self.runtime = self.runtime_choice.runtime
        self.human_class = loaded.config.num_parsing
        self.class_names = tuple(loaded.config.classes)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, threads: int | None = None,
                       postprocess_mode: str = PostprocessMode.EXACT, runtime: str = RuntimeName.AUTO,
                       runtime_max_rss_mib: float = DEFAULT_MAX_RSS_MIB) -> HumanParser:
        t0 = time.perf_counter()
        loaded = load_model_dir(model_dir)
        log.info("model loaded from %s in %.2f s, version %s%s", model_dir, time.perf_counter() - t0,
                 loaded.digest[:16], " (UNTRAINED)" if loaded.untrained else "")
        return cls(loaded, threads, postprocess_mode, runtime, runtime_max_rss_mib)

    @property
    def model_digest(self) -> str:
        return self.loaded.digest

    @property
    def untrained(self) -> bool:
        return self.loaded.untrained

    def parse(self, rgb: np.ndarray) -> ParsingResult:
        cfg = self.loaded.config
        t0 = time.perf_counter()
        prepared = prepare_image(rgb, cfg.min_size, cfg.max_size, cfg.size_divisibility, cfg.pixel_mean,
                                 cfg.pixel_std)
        t1 = time.perf_counter()
        out = self.runtime.forward(prepared.tensor)
        t2 = time.perf_counter()
        with torch.inference_mode():
            post = self._postprocess(out.pred_logits[0], out.pred_masks[0], prepared.padded_hw,
                                     prepared.resized_hw, prepared.original_hw, self.human_class)
        result = self._result(post)
        t3 = time.perf_counter()
        result.timings_s.update(preprocess=t1 - t0, network=t2 - t1, postprocess=t3 - t2, total=t3 - t0)
        if self.runtime.last_export_s is not None:  # this photo's padded size needed a new graph
            result.timings_s["export"] = self.runtime.last_export_s
        return result

    def _result(self, post: PostprocessOutput) -> ParsingResult:
        persons = [PersonInstance(index=k, score=h.score, mask=m, query_index=h.query_index)
                   for k, (h, m) in enumerate(zip(post.humans, post.human_masks, strict=True))]
        parts = []
        for inst in post.parts:
            overlaps = inst.person_overlap_px
            owner = int(np.argmax(overlaps)) if overlaps and max(overlaps) > 0 else None
            parts.append(PartInstance(inst.class_id, self.class_names[inst.class_id], inst.score,
                                      LazyMask(post.upsampler, inst.query_index), owner, inst.query_index))
        return ParsingResult(post.label_map, persons, parts, self.loaded.digest, self.loaded.untrained,
                             self.class_names, runtime=self.runtime.name)
