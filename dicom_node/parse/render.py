"""Pictures of a parsing: the colour label map, the overlay on the photo, and PNG files of both.

These are what a person looks at to judge whether the parsing is right, so the overlay keeps the
photo's exact size (it stays pixel-aligned with the photo and the label map) and leaves every
unlabelled pixel exactly as photographed. Colours come from :mod:`dicom_node.parse.classes` so the
overlay, the legend and the DICOM SEG agree on what "Hair" looks like.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_node.parse.classes import CLASS_COLORS, CLASS_NAMES
from dicom_node.parse.counting import classes_present

# One row per class; indexing it with a label map is the whole colouring step.
_PALETTE = np.asarray(CLASS_COLORS, dtype=np.uint8)

# Legend font in pixels is the shorter image side divided by this: about 17 px on a 768-wide
# photo, 67 px on a 3000-wide one, so the legend reads the same when the image is fitted to a screen.
_LEGEND_FONT_DIVISOR = 45
_LEGEND_MIN_FONT_PX = 12  # below this the default font stops being legible on a 480x640 photo
_LEGEND_FLOOR_FONT_PX = 6  # how far we shrink to fit a tiny image before we let the box clip
_LEGEND_BOX_RGBA = (0, 0, 0, 170)  # dark but see-through: the photo under it is still recognisable
_LEGEND_TEXT_RGB = (255, 255, 255)
_LEGEND_SWATCH_OUTLINE_RGB = (200, 200, 200)  # so dark classes (Dress, Background) show on the box

# Rows blended per step: bounds the temporaries to about a megabyte on a 4000x3000 photo.
_BLEND_ROWS = 128


def color_label_map(label_map: np.ndarray) -> np.ndarray:
    """RGB picture of a label map in the fixed class colours.

    A value outside the class list means the label map came from a different model or got
    corrupted; colouring it silently would show a wrong body part, so it is an error.
    """
    label_map = _check_label_map(label_map)
    return _PALETTE[label_map]


def overlay(
    photo_rgb: np.ndarray,
    label_map: np.ndarray,
    alpha: float = 0.5,
    legend: bool = True,
    class_names: Sequence[str] = CLASS_NAMES,
) -> np.ndarray:
    """The photo with each labelled pixel tinted by its class colour, plus a legend of the classes seen.

    Background pixels are left bit-for-bit as photographed (outside the legend box) so the
    overlay never alters what the clinician sees of the skin around the parsed regions.
    The legend goes into whichever corner covers the fewest labelled pixels, so it sits off the
    body rather than over it. The result has the photo's size; the input photo is not modified.
    """
    photo_rgb = np.asarray(photo_rgb)
    if photo_rgb.ndim != 3 or photo_rgb.shape[2] != 3:
        raise ValueError(f"photo must be an (H, W, 3) RGB array, got shape {photo_rgb.shape}")
    if photo_rgb.dtype != np.uint8:
        raise ValueError(f"photo must be uint8, got {photo_rgb.dtype}")
    label_map = _check_label_map(label_map)
    if label_map.shape != photo_rgb.shape[:2]:
        raise ValueError(
            f"label map is {label_map.shape[1]}x{label_map.shape[0]} but the photo is "
            f"{photo_rgb.shape[1]}x{photo_rgb.shape[0]} (width x height)"
        )
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")

    out = photo_rgb.copy()
    _blend_into(out, label_map, alpha)
    if legend:
        present = classes_present(label_map, len(_PALETTE))
        if present:
            if max(present) >= len(class_names):
                raise ValueError(
                    f"label map holds class {max(present)} but only {len(class_names)} class names were given"
                )
            _draw_legend(out, label_map, [(c, str(class_names[c])) for c in present])
    return out


def to_png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image: 8-bit grey for (H, W), RGB for (H, W, 3).

    PNG is lossless, so a label map written this way reads back with every class index intact.
    """
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write :func:`to_png_bytes` of the image to ``path`` (always PNG, whatever the suffix)."""
    _to_pil(image).save(path, format="PNG")


def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"PNG image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(image), mode="L")
    if image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise ValueError(f"PNG image must be (H, W) grey or (H, W, 3) RGB, got shape {image.shape}")


def _check_label_map(label_map: np.ndarray) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map must hold integer class indices, got {label_map.dtype}")
    if label_map.size:
        low, high = int(label_map.min()), int(label_map.max())
        if low < 0:
            raise ValueError(f"label map holds class {low}; class indices start at 0")
        if high >= len(_PALETTE):
            raise ValueError(
                f"label map holds class {high} but there are only {len(_PALETTE)} classes "
                f"(0..{len(_PALETTE) - 1})"
            )
    # uint8 keeps the palette lookup and the bincount cheap; the range check makes the cast safe.
    return label_map.astype(np.uint8, copy=False)


def _blend_tables(alpha: float) -> np.ndarray:
    # One 256-entry lookup table per (channel, class): the blend of every possible photo value with
    # that class colour, rounded once. Class 0's table is the identity, which is what keeps background
    # pixels bit-for-bit unchanged without a mask, and the per-pixel work is a single table lookup.
    values = np.arange(256, dtype=np.float32)
    colors = _PALETTE.astype(np.float32).T[:, :, None]  # (3, classes, 1)
    tables = np.floor((1.0 - alpha) * values + alpha * colors + 0.5).astype(np.uint8)
    tables[:, 0, :] = np.arange(256, dtype=np.uint8)
    return tables.reshape(3, -1)  # index: class * 256 + photo value


def _blend_into(out: np.ndarray, label_map: np.ndarray, alpha: float) -> None:
    if alpha == 0.0:
        return
    tables = _blend_tables(alpha)
    for top in range(0, label_map.shape[0], _BLEND_ROWS):
        rows = slice(top, top + _BLEND_ROWS)
        labels = label_map[rows]
        if not labels.any():
            continue  # strips of pure background are already the photo
        table_base = labels.astype(np.uint16) << 8
        for channel in range(3):
            out[rows, :, channel] = tables[channel][table_base + out[rows, :, channel]]




@dataclass(frozen=True)
class _LegendLayout:
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    pad: int
    swatch: int
    gap: int
    row_height: int
    width: int
    height: int


@lru_cache(maxsize=32)
def _legend_font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)


def _layout(names: list[str], font_px: int) -> _LegendLayout:
    font = _legend_font(font_px)
    text_width = max(int(np.ceil(font.getlength(name))) for name in names)
    pad = max(2, round(font_px * 0.5))
    swatch = max(4, round(font_px * 0.9))
    gap = max(2, round(font_px * 0.4))
    row_height = max(swatch, round(font_px * 1.3))
    width = pad + swatch + gap + text_width + pad
    height = pad + row_height * len(names) + pad
    return _LegendLayout(font, pad, swatch, gap, row_height, width, height)


def _draw_legend(out: np.ndarray, label_map: np.ndarray, entries: list[tuple[int, str]]) -> None:
    height, width = label_map.shape
    short_side = min(height, width)
    margin = max(2, round(short_side * 0.015))
    names = [name for _, name in entries]

    # Start at the size-proportional font and shrink only if the box would not fit inside the image.
    font_px = max(_LEGEND_MIN_FONT_PX, round(short_side / _LEGEND_FONT_DIVISOR))
    layout = _layout(names, font_px)
    while font_px > _LEGEND_FLOOR_FONT_PX and (
        layout.width > width - 2 * margin or layout.height > height - 2 * margin
    ):
        font_px -= 1
        layout = _layout(names, font_px)
    box_w = min(layout.width, width - 2 * margin)
    box_h = min(layout.height, height - 2 * margin)
    if box_w <= 0 or box_h <= 0:
        return  # an image this small has no room for any legend

    x0, y0 = _emptiest_corner(label_map, box_w, box_h, margin)
    region = Image.fromarray(out[y0:y0 + box_h, x0:x0 + box_w]).convert("RGBA")
    shade = Image.new("RGBA", region.size, _LEGEND_BOX_RGBA)
    region = Image.alpha_composite(region, shade)

    draw = ImageDraw.Draw(region)
    # Centre each name on its swatch using one reference box, so every row shares a baseline offset.
    ref_top, ref_bottom = layout.font.getbbox("Hg")[1::2]
    for row, (class_index, name) in enumerate(entries):
        row_top = layout.pad + row * layout.row_height
        centre_y = row_top + layout.row_height / 2
        sx = layout.pad
        sy = round(centre_y - layout.swatch / 2)
        draw.rectangle(
            (sx, sy, sx + layout.swatch - 1, sy + layout.swatch - 1),
            fill=CLASS_COLORS[class_index],
            outline=_LEGEND_SWATCH_OUTLINE_RGB,
            width=max(1, layout.swatch // 12),
        )
        tx = sx + layout.swatch + layout.gap
        ty = round(centre_y - (ref_top + ref_bottom) / 2)
        draw.text((tx, ty), name, font=layout.font, fill=_LEGEND_TEXT_RGB)

    out[y0:y0 + box_h, x0:x0 + box_w] = np.asarray(region.convert("RGB"))


def _emptiest_corner(label_map: np.ndarray, box_w: int, box_h: int, margin: int) -> tuple[int, int]:
    # Fewest labelled pixels under the box wins; ties go to the reading order (top-left first),
    # so the position is predictable on an empty or uniform map.
    height, width = label_map.shape
    corners = [
        (margin, margin),
        (width - margin - box_w, margin),
        (margin, height - margin - box_h),
        (width - margin - box_w, height - margin - box_h),
    ]
    covered = [int(np.count_nonzero(label_map[y:y + box_h, x:x + box_w])) for x, y in corners]
    return corners[int(np.argmin(covered))]
