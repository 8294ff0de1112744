"""Outlines of a region on the photo, for the SR's SCOORD POLYLINEs (PS3.3 C.18.6).

A region (a part class, a person) may be in several pieces: each 8-connected piece (the
connectivity of OpenCV's border following) gets one closed outline; pieces smaller than
:data:`MIN_PIECE_AREA_PX` or than :data:`MIN_PIECE_SHARE` of the region are left out (specks
a viewer would draw as dots), and at most :data:`MAX_PIECES` of the largest are kept.

Coordinates are image-relative (PS3.3 C.10.5.1.2, C.18.6.1.1): column\\row, where the top-left
corner of the top-left pixel is 0.0\\0.0 and that pixel's centre is 0.5\\0.5. The outline runs
along the pixel edges around the piece, not through its border pixels' centres, so that the
area it encloses is the piece's pixel count: ``cv2.findContours`` (``RETR_EXTERNAL``) traces
the piece on a grid of half-pixel steps (pixel corners, edge midpoints and centres), on which
a cell is set when it lies on the closed square of one of the piece's pixels. The traced
boundary is then the piece's edge, except that an inward (concave) corner is cut short by a
half-pixel diagonal (1/8 pixel more area each; two pixels that touch only at a corner are joined
the same way). A 40 x 30 pixel rectangle in the photo's top-left corner has the outline
0\\0, 0\\30, 40\\30, 40\\0, 0\\0 (column\\row); a disc of radius 150 pixels encloses 0.15 % more
than its pixel count. Holes inside a piece are not outlined (``RETR_EXTERNAL``), and a piece
lying in another piece's hole is counted with it rather than outlined.

An outline has at most :data:`MAX_OUTLINE_POINTS` points, the closing one included (first point
repeated last, C.18.6.1.2 for a closed POLYLINE): the traced boundary keeps its corners only
(``CHAIN_APPROX_SIMPLE``) and, when they are more, is simplified with ``cv2.approxPolyDP``
at a tolerance that starts at half a pixel and grows by half until the outline fits. 200 points
draw a body part smoothly in a viewer, and bound a region's outlines to 16 kB of Graphic Data
(10 pieces x 200 points x two 32-bit floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MAX_OUTLINE_POINTS = 200  # points of one closed outline, the repeated first point included
MIN_PIECE_AREA_PX = 16  # pieces below this many pixels get no outline
MIN_PIECE_SHARE = 0.01  # nor do pieces below this fraction of the region's pixels
MAX_PIECES = 10  # outlines per region at most: the largest pieces
_FIRST_TOLERANCE_PX = 0.5
_TOLERANCE_GROWTH = 1.5


@dataclass(frozen=True)
class Outline:
    """One piece of a region: its closed outline and its own pixel count.

    ``points`` is a float32 (n, 2) array of column, row image coordinates (C.10.5.1.2) with
    ``points[0] == points[-1]``; ``pixels`` is the number of region pixels within the outline
    (the piece's, and those of any piece lying in one of its holes).
    """

    points: np.ndarray
    pixels: int

    @property
    def enclosed_area_px(self) -> float:
        """Area inside the outline (shoelace formula), in pixels."""
        x, y = self.points[:, 0].astype(np.float64), self.points[:, 1].astype(np.float64)
        return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)


def trace_outlines(
    mask: np.ndarray,
    max_points: int = MAX_OUTLINE_POINTS,
    min_area_px: int = MIN_PIECE_AREA_PX,
    min_share: float = MIN_PIECE_SHARE,
    max_pieces: int = MAX_PIECES,
) -> list[Outline]:
    """The outlines of ``mask``'s pieces, largest piece first (see the module docstring).

    ``mask`` is a 2-D boolean (or 0/1) array the size of the photo. An empty mask gives no
    outline. Raises ValueError for a mask that is not 2-D or a ``max_points`` below 4 (a closed
    outline needs three corners and the closing point).
    """
    if mask.ndim != 2:
        raise ValueError(f"a region mask must be 2-D (rows, columns), got shape {mask.shape}")
    if max_points < 4:
        raise ValueError(f"an outline needs at least 4 points (a triangle, closed), got max_points={max_points}")
    if mask.dtype == np.bool_:
        binary = np.ascontiguousarray(mask).view(np.uint8)  # no copy for a contiguous mask
    else:
        binary = (np.asarray(mask) != 0).astype(np.uint8)
    x0, y0, width, height = cv2.boundingRect(binary)
    if width == 0 or height == 0:
        return []
    crop = binary[y0:y0 + height, x0:x0 + width]
    threshold = max(min_area_px, min_share * cv2.countNonZero(crop))
    # Find the pieces by their outer borders on the pixel grid (cheap even for thousands of
    # specks: a speck's bounding box already rules it out), then measure and trace only those
    # that can pass the threshold.
    borders, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pieces: list[tuple[int, int, int, np.ndarray]] = []
    for border in borders:
        left, top, w, h = cv2.boundingRect(border)
        if w * h < threshold:
            continue
        # the region's pixels within this outer border (a piece in one of its holes included)
        inside = np.zeros((h, w), dtype=np.uint8)
        cv2.drawContours(inside, [border], 0, 1, thickness=cv2.FILLED, offset=(-left, -top))
        piece = inside & crop[top:top + h, left:left + w]
        pixels = cv2.countNonZero(piece)
        if pixels >= threshold:
            pieces.append((pixels, top, left, piece))
    pieces.sort(key=lambda p: (-p[0], p[1], p[2]))  # largest first; ties in reading order
    return [
        Outline(points=_outline(piece, x0 + left, y0 + top, max_points), pixels=pixels)
        for pixels, top, left, piece in pieces[:max_pieces]
    ]


def _outline(piece: np.ndarray, x0: int, y0: int, max_points: int) -> np.ndarray:
    """The closed outline of a piece (0/1 array) whose bounding box starts at column x0, row y0."""
    rows, columns = piece.shape
    # Half-pixel grid, padded by one cell: pixel (r, c)'s centre is cell (2r + 2, 2c + 2), its
    # corners and edge midpoints the 3x3 cells around it; cell g is image coordinate (g - 1) / 2.
    grid = np.zeros((2 * rows + 3, 2 * columns + 3), dtype=np.uint8)
    grid[2:-1:2, 2:-1:2] = piece
    grid = cv2.dilate(grid, np.ones((3, 3), dtype=np.uint8))
    contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    traced = max(contours, key=cv2.contourArea)  # one piece, one outer border
    contour = traced
    tolerance_cells = 2 * _FIRST_TOLERANCE_PX  # a grid cell is half a pixel
    while len(contour) > max_points - 1:
        simpler = cv2.approxPolyDP(traced, tolerance_cells, closed=True)
        if len(simpler) < 3:  # cannot happen before the outline fits; never give a degenerate one
            break
        contour = simpler
        tolerance_cells *= _TOLERANCE_GROWTH
    corners = contour.reshape(-1, 2).astype(np.float64)
    points = np.empty((len(corners) + 1, 2), dtype=np.float32)
    points[:-1, 0] = (corners[:, 0] - 1) / 2 + x0
    points[:-1, 1] = (corners[:, 1] - 1) / 2 + y0
    points[-1] = points[0]
    return points
