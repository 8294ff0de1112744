"""Runtime name -> the factory that builds it over a loaded model.

Candidates whose packages are heavy (OpenVINO) or that need calibration images (int8) are
imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from dicom_node.model.checkpoint import LoadedModel
from dicom_node.model.runtime.base import NetworkRuntime, RuntimeUnavailable
from dicom_node.model.runtime.cache import cache_dir_for
from dicom_node.model.runtime.eager import EagerRuntime
from dicom_node.model.runtime.names import RUNTIME_CHOICES, RuntimeName

Factory = Callable[[LoadedModel, "int | None"], NetworkRuntime]


def prepare_kwargs(loaded: LoadedModel) -> dict:
    """The preprocessing parameters of this model's configuration, as ``prepare_image`` takes them."""
    cfg = loaded.config
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, "size_divisibility": cfg.size_divisibility,
            "pixel_mean": cfg.pixel_mean, "pixel_std": cfg.pixel_std}


def _eager(loaded: LoadedModel, threads: int | None) -> NetworkRuntime:
    return EagerRuntime(loaded.model)


def _openvino(loaded: LoadedModel, threads: int | None) -> NetworkRuntime:
    from dicom_node.model.runtime.openvino import OpenVinoRuntime

    return OpenVinoRuntime(loaded.model, loaded.digest, cache_dir_for(loaded.model_dir, loaded.digest), threads)


def _openvino_bf16(loaded: LoadedModel, threads: int | None) -> NetworkRuntime:
    from dicom_node.model.runtime.cpu import native_bf16_refusal
    from dicom_node.model.runtime.openvino import OpenVinoBf16Runtime

    refusal = native_bf16_refusal()
    if refusal:
        raise RuntimeUnavailable(refusal)
    return OpenVinoBf16Runtime(loaded.model, loaded.digest, cache_dir_for(loaded.model_dir, loaded.digest), threads)


def _eager_bf16(loaded: LoadedModel, threads: int | None) -> NetworkRuntime:
    from dicom_node.model.runtime.bf16 import EagerBf16Runtime

    return EagerBf16Runtime(loaded.model)


def _eager_int8(loaded: LoadedModel, threads: int | None) -> NetworkRuntime:
    from dicom_node.model.preprocess import prepare_image
    from dicom_node.model.runtime.agreement import reference_images
    from dicom_node.model.runtime.int8 import Int8BackboneRuntime

    calibration = [prepare_image(rgb, **prepare_kwargs(loaded)).tensor for rgb in reference_images()]
    return Int8BackboneRuntime(loaded.model, calibration)


FACTORIES: dict[RuntimeName, Factory] = {
    RuntimeName.EAGER: _eager,
    RuntimeName.OPENVINO: _openvino,
    RuntimeName.EAGER_INT8: _eager_int8,
    RuntimeName.OPENVINO_BF16: _openvino_bf16,
    RuntimeName.EAGER_BF16: _eager_bf16,
}


def build_runtime(name: str, loaded: LoadedModel, threads: int | None = None) -> NetworkRuntime:
    """One runtime over a loaded model (prepared for inference). Raises RuntimeUnavailable."""
    factory = FACTORIES.get(name)  # type: ignore[call-overload]  # a str looks up a StrEnum key
    if factory is None:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_CHOICES)}")
    return factory(loaded, threads)
