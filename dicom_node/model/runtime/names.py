"""The inference runtimes by name, without torch: the configuration and the CLI offer these.

``eager`` is the reference (native PyTorch, fp32); the others are candidates that are used only
when they pass their agreement check (:mod:`.agreement`); ``auto`` picks among them by
measurement (:mod:`.choice`).
"""

from __future__ import annotations

from enum import StrEnum


class RuntimeName(StrEnum):
    """``[worker] runtime`` and ``dicom-node parse --runtime``."""

    AUTO = "auto"  # the fastest candidate that passes its check and beats eager, else eager
    EAGER = "eager"  # native PyTorch in fp32: the reference
    OPENVINO = "openvino"  # the same fp32 network as an OpenVINO graph per padded input shape
    EAGER_INT8 = "eager-int8"  # an int8 backbone (PyTorch's quantized kernels)
    OPENVINO_BF16 = "openvino-bf16"  # the OpenVINO graph with bf16 inference precision
    EAGER_BF16 = "eager-bf16"  # PyTorch bf16 autocast, deformable-attention sampling in fp32


RUNTIME_CHOICES: tuple[str, ...] = tuple(name.value for name in RuntimeName)
RUNTIMES: tuple[RuntimeName, ...] = tuple(name for name in RuntimeName if name != RuntimeName.AUTO)
CANDIDATES: tuple[RuntimeName, ...] = tuple(name for name in RUNTIMES if name != RuntimeName.EAGER)
# Offered only where the CPU has bf16 instructions (:mod:`.cpu`); elsewhere listed with the reason.
NEEDS_NATIVE_BF16: frozenset[RuntimeName] = frozenset({RuntimeName.OPENVINO_BF16, RuntimeName.EAGER_BF16})
# Raised when what a runtime computes changes, so that checks cached under the old code are
# measured again (part of :func:`~dicom_node.model.runtime.choice.check_key`).
# eager-bf16 2: only the sampling offsets and the sampler stay fp32 (was: every MSDeformAttn whole).
REVISIONS: dict[RuntimeName, int] = {RuntimeName.EAGER_BF16: 2}
# Raised when the shared network code (dicom_node/model) changes what every runtime computes,
# the eager reference included. 2: the deformable attention's softmax written out (a few ulp).
NETWORK_REVISION = 2
# ``auto`` takes a faster candidate only if a worker running it stays within this resident size or
# within eager fp32's own, whichever is larger: the memory a machine was sized for is part of what
# "auto" must not change behind the administrator's back (issue 17's 1.2 GiB target; measured:
# OpenVINO fp32 1.54 GiB against eager's 1.1 GiB at 1024x768). worker.runtime_max_rss_mib.
DEFAULT_MAX_RSS_MIB = 1229.0
