"""Typed M2FP hyper-parameters, read from a ModelScope ``configuration.json``.

Every layer takes its sizes from here, so a checkpoint trained with other sizes fails loudly in
the strict loader instead of loading half-random (what the official loader does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """configuration.json is missing, unreadable or asks for an architecture we do not build."""


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 101
    stem_out_channels: int = 128
    res2_out_channels: int = 256
    num_groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    res5_dilation: int = 1


@dataclass(frozen=True)
class PixelDecoderConfig:
    conv_dim: int = 256
    mask_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    enc_layers: int = 6
    n_points: int = 4
    common_stride: int = 4
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")


@dataclass(frozen=True)
class DecoderConfig:
    num_classes: int = 21
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9
    pre_norm: bool = False
    mask_dim: int = 256


@dataclass(frozen=True)
class M2FPConfig:
    backbone: BackboneConfig
    pixel_decoder: PixelDecoderConfig
    decoder: DecoderConfig
    classes: tuple[str, ...]
    num_parsing: int = 20
    # Preprocessing of the official pipeline (ImageHumanParsingPipeline): shorter side to 640,
    # longer side at most 1333, padding to a multiple of 32.
    min_size: int = 640
    max_size: int = 1333
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> M2FPConfig:
        try:
            model = cfg["model"]
            bb, enc, dec = model.get("backbone", {}), model.get("encoder", {}), model.get("decoder", {})
            classes = tuple(model["classes"])
        except (KeyError, TypeError) as exc:
            raise ModelConfigError(f"configuration.json lacks model/{exc}") from exc
        if bb.get("norm", "BN") != "BN":
            raise ModelConfigError(f"backbone.norm={bb.get('norm')!r}: only BN is supported")
        if tuple(bb.get("res5_multi_grid", (1, 1, 1))) != (1, 1, 1) or bb.get("res4_dilation", 1) != 1:
            raise ModelConfigError("backbone dilation/multi-grid other than 1 is not supported")
        if dec.get("enforce_input_project", False):
            raise ModelConfigError("decoder.enforce_input_project=true is not supported")
        backbone = BackboneConfig(
            depth=int(bb.get("depth", 101)),
            stem_out_channels=int(bb.get("stem_out_channels", 128)),
            res2_out_channels=int(bb.get("res2_out_channels", 256)),
            num_groups=int(bb.get("num_groups", 1)),
            width_per_group=int(bb.get("width_per_group", 64)),
            stride_in_1x1=bool(bb.get("stride_in_1x1", False)),
            res5_dilation=int(bb.get("res5_dilation", 1)),
        )
        if backbone.res5_dilation != 1:
            raise ModelConfigError("backbone.res5_dilation other than 1 is not supported")
        pixel_decoder = PixelDecoderConfig(
            conv_dim=int(enc.get("conv_dim", 256)),
            mask_dim=int(enc.get("mask_dim", 256)),
            nheads=int(enc.get("transformer_nheads", 8)),
            dim_feedforward=int(enc.get("transformer_dim_feedforward", 1024)),
            enc_layers=int(enc.get("transformer_enc_layers", 6)),
            common_stride=int(enc.get("common_stride", 4)),
            transformer_in_features=tuple(enc.get("transformer_in_features", ("res3", "res4", "res5"))),
        )
        if pixel_decoder.transformer_in_features != ("res3", "res4", "res5") or pixel_decoder.common_stride != 4:
            raise ModelConfigError("pixel decoder must use res3..res5 with common stride 4")
        decoder = DecoderConfig(
            num_classes=int(dec.get("num_classes", 21)),
            hidden_dim=int(dec.get("hidden_dim", 256)),
            num_queries=int(dec.get("num_queries", 100)),
            nheads=int(dec.get("nheads", 8)),
            dim_feedforward=int(dec.get("dim_feedforward", 2048)),
            dec_layers=int(dec.get("dec_layers", 9)),
            pre_norm=bool(dec.get("pre_norm", False)),
            mask_dim=int(dec.get("mask_dim", 256)),
        )
        if decoder.num_classes != len(classes):
            raise ModelConfigError(f"decoder.num_classes={decoder.num_classes} but {len(classes)} class names")
        # Not in the official file (its pipeline hard-codes 640/1333): lets an untrained test model
        # run on small inputs. Absent, the official values apply.
        min_size = int(model.get("input_min_size", 640))
        max_size = int(model.get("input_max_size", 1333))
        if not 32 <= min_size <= max_size:
            raise ModelConfigError(f"input_min_size={min_size} / input_max_size={max_size} are not usable")
        return cls(backbone, pixel_decoder, decoder, classes, num_parsing=int(model.get("num_parsing", 20)),
                   min_size=min_size, max_size=max_size)

    @classmethod
    def from_file(cls, path: str | Path) -> M2FPConfig:
        path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"cannot read {path}: {exc}") from exc
        return cls.from_dict(cfg)
