"""Label Studio polygons -> pixel masks, in Label Studio's frame.

Frame: a point stored as percent p maps to x = p / 100 * W (y likewise with H); the image spans [0, W] x [0, H]
and pixel (row r, col c) is the square [c, c+1] x [r, r+1]. A pixel belongs to the polygon when its CENTRE
(c + 0.5, r + 0.5) is inside, which is how backend.geometry traces its rings (an exact ring rasterises back to
its mask bit for bit).

A centre exactly on an edge follows the top-left rule (see ON_EDGE_PX).

Fill rule: non-zero winding, the default of the HTML canvas that draws Label Studio's regions. Our polygons cut
holes out with zero-width slits (outer ring clockwise, hole ring counter-clockwise, joined out and back along one
segment), so both rules give the same pixels for them; they differ only for polygons an annotator made
self-overlapping, where non-zero is what the annotator saw on screen.

Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

NONZERO = "nonzero"
EVENODD = "evenodd"
# A pixel centre this close to an edge counts as on it. Traced outlines have many 45-degree edges through pixel
# centres; left to float noise those pixels would flip at random. On-edge centres follow the top-left rule of GPU
# rasterisers instead: in on a left or top edge, out on a right or bottom one.
ON_EDGE_PX = 1e-6


@dataclass(frozen=True)
class Patch:
    """A bool mask cropped to its bounding box: `mask` sits at rows [top, top + h), cols [left, left + w)."""

    mask: np.ndarray
    top: int
    left: int

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def slices(self) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.top, self.top + h), slice(self.left, self.left + w)

    def full(self, width: int, height: int) -> np.ndarray:
        """The mask on the whole (height, width) image."""
        out = np.zeros((height, width), dtype=bool)
        out[self.slices] = self.mask
        return out

    @classmethod
    def from_full(cls, mask: np.ndarray) -> "Patch":
        """Crop a whole-image bool mask to its bounding box (an empty mask gives a 0x0 patch)."""
        m = np.asarray(mask, dtype=bool)
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            return cls(np.zeros((0, 0), dtype=bool), 0, 0)
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(m[r0:r1].any(axis=0))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        return cls(m[r0:r1, c0:c1].copy(), r0, c0)


def percent_to_pixels(points: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Label Studio points (percent of the image) -> (N, 2) float64 pixel-corner coordinates (x, y)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3:
        raise ValueError(f"a polygon needs >= 3 [x, y] points, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("polygon has non-finite coordinates")
    return p * np.array([width / 100.0, height / 100.0])


def fill_polygon(ring: np.ndarray, width: int, height: int, rule: str = NONZERO) -> Patch:
    """Pixels of a (height, width) image whose centre is inside `ring` (pixel-corner coordinates).

    Scanline by winding: every edge crossing a row's centre line adds its direction (+1 down, -1 up) from the
    first pixel whose centre lies right of the crossing; a pixel is inside when the running sum is non-zero
    (or odd, for `evenodd`). Rows count an edge over [y_low, y_high) so shared vertices count once.
    """
    if rule not in (NONZERO, EVENODD):
        raise ValueError(f"rule must be {NONZERO!r} or {EVENODD!r}, got {rule!r}")
    p = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    empty = Patch(np.zeros((0, 0), dtype=bool), 0, 0)
    if len(p) < 3:
        return empty
    q = np.concatenate((p[1:], p[:1]))
    # Only rows/cols the ring can reach; pixel centres outside the image are never inside it.
    r0 = int(np.clip(np.ceil(p[:, 1].min() - 0.5), 0, height))
    r1 = int(np.clip(np.ceil(p[:, 1].max() - 0.5), 0, height))
    c0 = int(np.clip(np.ceil(p[:, 0].min() - 0.5), 0, width))
    c1 = int(np.clip(np.ceil(p[:, 0].max() - 0.5), 0, width))
    if r1 <= r0 or c1 <= c0:
        return empty
    y0, y1 = p[:, 1], q[:, 1]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first = np.clip(np.ceil(lo - 0.5).astype(np.int64), r0, r1)
    stop = np.clip(np.ceil(hi - 0.5).astype(np.int64), r0, r1)
    counts = np.maximum(stop - first, 0)
    total = int(counts.sum())
    if total == 0:
        return empty
    edge = np.repeat(np.arange(len(p)), counts)
    row = np.repeat(first, counts) + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    t = (row + 0.5 - p[edge, 1]) / (q[edge, 1] - p[edge, 1])
    x = p[edge, 0] + t * (q[edge, 0] - p[edge, 0])
    direction = np.where(q[edge, 1] > p[edge, 1], 1, -1).astype(np.int32)
    col = np.clip(np.ceil(x - 0.5 - ON_EDGE_PX).astype(np.int64), c0, c1) - c0
    acc = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    np.add.at(acc, (row - r0, col), direction if rule == NONZERO else 1)
    winding = np.cumsum(acc, axis=1)[:, :-1]
    mask = winding != 0 if rule == NONZERO else (winding & 1).astype(bool)
    return Patch(mask, r0, c0)


def polygon_mask(points: Sequence[Sequence[float]], width: int, height: int, rule: str = NONZERO) -> Patch:
    """A Label Studio polygon (percent points) -> its pixels on a (height, width) image."""
    return fill_polygon(percent_to_pixels(points, width, height), width, height, rule)
