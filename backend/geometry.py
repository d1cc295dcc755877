"""Boolean masks -> polygon rings that Label Studio can draw and an annotator can edit.

Coordinate frame (Label Studio's): the image spans [0, W] x [0, H]; pixel (row r, col c) is the
square [c, c+1] x [r, r+1]. Rings are therefore traced on pixel CORNERS, not pixel centres:
rasterising an unsimplified ring (pixel in <=> its centre is inside) gives the mask back exactly.
Design notes, measured trade-offs and the hole policy: docs/geometry.md.

Pure functions, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np

# Tolerance of the Douglas-Peucker simplification, in pixels: EPS_REL * sqrt(component area) / detail,
# clipped to [EPS_MIN, EPS_MAX] / detail. Growing with size keeps small parts (a 20-pixel ear stays
# an ear) while a 500x500 coat gets a handful of pixels of slack instead of thousands of vertices.
EPS_REL = 0.012
EPS_MIN = 0.6
EPS_MAX = 6.0
# Vertex budget of one region (outer ring + bridged holes) at detail 1; LS's editor freezes on
# polygons with thousands of points (label-studio #4617). Scales with detail, never above VERTEX_CAP_MAX.
VERTICES_PER_DETAIL = 200
VERTEX_CAP_MAX = 1000
# A simplified ring whose area moved by more than this fraction is re-simplified more finely:
# catches thin parts (1-2 px wide limbs) that Douglas-Peucker would flatten to nothing.
AREA_GUARD = 0.15
# Holes: a hole is cut out (keyhole bridge) when it is at least this fraction of the outer ring's
# area and at least min_pixels; smaller holes are filled (they cost < 0.5% IoU each, and every
# bridge costs vertices). At most MAX_HOLES holes per region, largest first.
HOLE_MIN_FRACTION = 0.005
MAX_HOLES = 8


@dataclass(frozen=True)
class Component:
    """One 8-connected component of a mask, outlined exactly on pixel corners.

    `outer` has positive signed area (shoelace, x right / y down), every hole negative: joining them
    with bridges gives a single ring whose fill (even-odd or non-zero) excludes the holes.
    """

    outer: np.ndarray            # (N, 2) float64 corner coordinates, turning points only
    holes: tuple[np.ndarray, ...]
    area: int                    # pixels in the component (outer area minus holes)


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area; positive for clockwise-on-screen rings (x right, y down)."""
    p = np.asarray(ring, dtype=np.float64)
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    # Element-wise sums, not np.dot: BLAS may spread a dot over threads, costly on a busy machine.
    return 0.5 * float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum() + x[-1] * y[0] - x[0] * y[-1])


def _next(a: np.ndarray) -> np.ndarray:
    """a[i + 1] for every i, cyclically (np.roll(a, -1, 0) without its overhead)."""
    return np.concatenate((a[1:], a[:1]))


def _prev(a: np.ndarray) -> np.ndarray:
    return np.concatenate((a[-1:], a[:-1]))


def _chain_to_corners(chain: np.ndarray) -> np.ndarray:
    """A cv2 contour on the corner grid (U coordinates) -> corner ring, turning points only.

    On the grid, corners sit at odd/odd cells, edge midpoints at odd/even, pixel centres at even/even.
    OpenCV's border follower cuts concave corners with a diagonal step between two edge midpoints;
    the true outline goes through the odd/odd cell of that 2x2 block, which is put back.
    """
    pts = chain.reshape(-1, 2).astype(np.int64)
    nxt = _next(pts)
    step = nxt - pts
    diag = (np.abs(step[:, 0]) == 1) & (np.abs(step[:, 1]) == 1)
    corner_fix = np.where(pts % 2 == 1, pts, nxt)
    n = len(pts)
    pos = np.arange(n) + np.concatenate(([0], np.cumsum(diag)[:-1]))
    seq = np.empty((n + int(diag.sum()), 2), dtype=np.int64)
    seq[pos] = pts
    seq[pos[diag] + 1] = corner_fix[diag]
    corners = seq[(seq[:, 0] % 2 == 1) & (seq[:, 1] % 2 == 1)]
    if len(corners) < 3:
        return corners.astype(np.float64)
    d_in = corners - _prev(corners)
    d_out = _next(corners) - corners
    turning = np.any(d_in != d_out, axis=1)
    return corners[turning].astype(np.float64)


def trace_components(mask: np.ndarray) -> list[Component]:
    """Exact pixel-corner outlines of every 8-connected component of `mask`, largest first.

    8-connectivity: pixels touching only at a corner belong to one region (the ring passes twice
    through that corner). Human parts are thin and diagonal in places; 4-connectivity would cut a
    forearm into slivers.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    m = m.astype(bool, copy=False)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return []
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(m[r0:r1].any(axis=0))   # second pass over the occupied rows only
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    crop = m[r0:r1, c0:c1]
    h, w = crop.shape
    # Corner grid: corner x -> 2x+1, pixel centre c+0.5 -> 2c+2; zero margin so no outline touches
    # the array border. Dilating the centres by 3x3 gives the closed union of the pixel squares.
    grid = np.zeros((2 * h + 3, 2 * w + 3), dtype=np.uint8)
    grid[2:2 * h + 1:2, 2:2 * w + 1:2] = crop
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    offset = np.array([c0, r0], dtype=np.float64)

    def to_image(chain: np.ndarray) -> np.ndarray:
        return (_chain_to_corners(chain) - 1.0) / 2.0 + offset

    components = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        outer = to_image(contours[i])
        if signed_area(outer) < 0:
            outer = outer[::-1].copy()
        holes = []
        while child != -1:
            hole = to_image(contours[child])
            if signed_area(hole) > 0:
                hole = hole[::-1].copy()
            holes.append(hole)
            child = hierarchy[child][0]
        area = signed_area(outer) + sum(signed_area(hole) for hole in holes)
        components.append(Component(outer, tuple(holes), int(round(area))))
    components.sort(key=lambda c: (-c.area, c.outer[:, 1].min(), c.outer[:, 0].min()))
    return components


def ring_tolerance(area: float, detail: float) -> float:
    """Simplification tolerance in pixels for a component of `area` pixels at `detail`."""
    if detail <= 0:
        raise ValueError(f"detail must be > 0, got {detail}")
    return float(np.clip(EPS_REL * math.sqrt(max(area, 0.0)), EPS_MIN, EPS_MAX)) / detail


def vertex_cap(detail: float) -> int:
    """Vertex budget of one region at `detail`."""
    return int(min(VERTEX_CAP_MAX, max(16, round(VERTICES_PER_DETAIL * max(detail, 1.0)))))


def _douglas_peucker(ring: np.ndarray, eps: float) -> np.ndarray:
    approx = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), eps, True)
    # Vertices of the simplified ring are a subset of the exact ones: copy them exactly.
    out = approx.reshape(-1, 2).astype(np.float64)
    return np.round(out * 2.0) / 2.0


def simplify_ring(ring: np.ndarray, eps: float) -> np.ndarray:
    """Douglas-Peucker at `eps` pixels, refined (eps halved) while the area moves by > AREA_GUARD.

    Returns the exact ring when no tolerance >= 0.25 px keeps the area.
    """
    ring = np.asarray(ring, dtype=np.float64)
    if len(ring) <= 4:
        return ring
    target = abs(signed_area(ring))
    while eps >= 0.25:
        simple = _douglas_peucker(ring, eps)
        if len(simple) >= 3:
            area = signed_area(simple)
            if area * signed_area(ring) > 0 and abs(abs(area) - target) <= AREA_GUARD * target:
                return simple
        eps /= 2.0
    return ring


def _subsample(ring: np.ndarray, count: int) -> np.ndarray:
    idx = np.unique(np.linspace(0, len(ring), num=count, endpoint=False).astype(int))
    return ring[idx]


def _orient(ax, ay, bx, by, cx, cy):
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


def _segment_is_free(a: np.ndarray, b: np.ndarray, p: np.ndarray, q: np.ndarray) -> bool:
    """True when segment a-b neither crosses nor touches any edge p[i]-q[i] (except at a or b)."""
    at_end = (np.all(p == a, axis=1) | np.all(p == b, axis=1) |
              np.all(q == a, axis=1) | np.all(q == b, axis=1))
    p, q = p[~at_end], q[~at_end]
    if len(p) == 0:
        return True
    o1 = _orient(a[0], a[1], b[0], b[1], p[:, 0], p[:, 1])
    o2 = _orient(a[0], a[1], b[0], b[1], q[:, 0], q[:, 1])
    o3 = _orient(p[:, 0], p[:, 1], q[:, 0], q[:, 1], a[0], a[1])
    o4 = _orient(p[:, 0], p[:, 1], q[:, 0], q[:, 1], b[0], b[1])
    if np.any((o1 * o2 < 0) & (o3 * o4 < 0)):
        return False
    # An edge end lying on the open segment would pinch the bridge: refuse it too.
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    for pts, o in ((p, o1), (q, o2)):
        on = (o == 0) & np.all((pts >= lo) & (pts <= hi), axis=1)
        if np.any(on):
            return False
    return True


def _inside(point: np.ndarray, p: np.ndarray, q: np.ndarray) -> bool:
    """Even-odd point-in-region test against edges p[i]-q[i]."""
    x, y = point
    crosses = (p[:, 1] <= y) != (q[:, 1] <= y)
    if not np.any(crosses):
        return False
    pc, qc = p[crosses], q[crosses]
    xs = pc[:, 0] + (y - pc[:, 1]) * (qc[:, 0] - pc[:, 0]) / (qc[:, 1] - pc[:, 1])
    return bool(np.count_nonzero(xs > x) % 2)


def _edges(rings: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rings = [r for r in rings if len(r)]
    if not rings:
        empty = np.zeros((0, 2))
        return empty, empty
    p = np.concatenate(rings)
    q = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    return p, q


def bridge_holes(outer: np.ndarray, holes: Sequence[np.ndarray], max_candidates: int = 400) -> np.ndarray:
    """One ring excluding `holes`: each hole is joined by a zero-width cut (keyhole) to the ring.

    The cut goes out along a segment and back along the same segment, so the area is exact under
    both fill rules. The cut is the shortest vertex-to-vertex segment that crosses no edge and runs
    inside the region; a hole for which none of the `max_candidates` shortest candidates qualifies
    is left filled.
    """
    ring = np.asarray(outer, dtype=np.float64)
    if signed_area(ring) < 0:
        ring = ring[::-1]
    pending = []
    for hole in holes:
        hole = np.asarray(hole, dtype=np.float64)
        if len(hole) < 3:
            continue
        pending.append(hole[::-1] if signed_area(hole) > 0 else hole)
    # Nearest hole first: its cut is short and crosses nothing; farther holes then reach the ring
    # (which now includes the nearer holes) without threading between pending ones.
    while pending:
        dists = [((ring[:, None, :] - h[None, :, :]) ** 2).sum(axis=2) for h in pending]
        k = int(np.argmin([d.min() for d in dists]))
        hole, d2 = pending.pop(k), dists[k]
        p, q = _edges([ring, hole, *pending])
        order = np.argsort(d2, axis=None, kind="stable")[:max_candidates]
        for flat in order:
            i, j = np.unravel_index(flat, d2.shape)
            a, b = ring[i], hole[j]
            if not _segment_is_free(a, b, p, q):
                continue
            if not _inside((a + b) / 2.0, p, q):
                continue
            loop = np.concatenate((hole[j:], hole[:j + 1]))
            ring = np.concatenate((ring[:i + 1], loop, ring[i:]))
            break
    return _drop_repeats(ring)


def _drop_repeats(ring: np.ndarray) -> np.ndarray:
    """Without consecutive duplicate points (a hole touching the outline at a corner gives a
    zero-length cut): zero-length edges confuse polygon editors."""
    same = np.all(ring == np.roll(ring, -1, axis=0), axis=1)
    return ring[~same] if same.any() and not same.all() else ring


def mask_to_polygons(mask: np.ndarray, detail: float = 1.0, min_pixels: int = 16,
                     *, max_vertices: int | None = None) -> list[np.ndarray]:
    """One editable ring per 8-connected component of `mask`, in pixel-corner coordinates.

    - components under `min_pixels` pixels are dropped (specks);
    - rings are simplified with a tolerance that grows with the component (`ring_tolerance`), then
      coarsened further if needed to stay within `max_vertices` (default `vertex_cap(detail)`);
    - holes of at least HOLE_MIN_FRACTION of the region (and >= min_pixels) are cut out with keyhole
      bridges, smaller ones are filled (see docs/geometry.md).
    Rings are (N, 2) float arrays of (x, y), largest component first.
    """
    cap = max_vertices if max_vertices is not None else vertex_cap(detail)
    if cap < 4:
        raise ValueError(f"max_vertices must be >= 4, got {cap}")
    rings = []
    for comp in trace_components(mask):
        if comp.area < max(min_pixels, 1):
            continue
        rings.append(_component_ring(comp, detail, min_pixels, cap))
    return rings


def _component_ring(comp: Component, detail: float, min_pixels: int, cap: int) -> np.ndarray:
    outer_area = signed_area(comp.outer)
    hole_floor = max(min_pixels, HOLE_MIN_FRACTION * outer_area)
    holes = sorted((h for h in comp.holes if -signed_area(h) >= hole_floor), key=signed_area)[:MAX_HOLES]
    start = ring_tolerance(comp.area, detail)
    # First the area-guarded simplification, coarsened until the region fits the vertex budget;
    # then, for thin parts no guarded ring fits (long 1-2 px straps), plain Douglas-Peucker:
    # editability wins over fidelity there.
    for guarded in (True, False):
        eps = start
        for _ in range(25 if guarded else 60):
            simplify = simplify_ring if guarded else _douglas_peucker
            outer = simplify(comp.outer, eps)
            kept = [s for s in (simplify(h, eps) for h in holes)
                    if len(s) >= 3 and -signed_area(s) >= 0.5 * hole_floor]
            if len(outer) >= 3 and len(outer) + sum(len(h) + 2 for h in kept) <= cap:
                return bridge_holes(outer, kept) if kept else outer
            eps *= 1.25
    return _subsample(comp.outer, cap)


def to_percent(ring: np.ndarray, width: int, height: int, decimals: int = 3) -> list[list[float]]:
    """Ring in pixel-corner coordinates -> Label Studio points, percent of the ORIGINAL image size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    p = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    pct = np.empty_like(p)
    pct[:, 0] = p[:, 0] * (100.0 / width)
    pct[:, 1] = p[:, 1] * (100.0 / height)
    pct = np.clip(np.round(pct, decimals), 0.0, 100.0)
    return pct.tolist()


def from_percent(points: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Label Studio points (percent) -> ring in pixel-corner coordinates."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return p * np.array([width / 100.0, height / 100.0])


def rasterise(rings: np.ndarray | Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """Bool (height, width) mask of the pixels whose CENTRE lies inside the ring(s), even-odd rule.

    The reference for fidelity: an exact corner ring rasterises back to its mask, bit for bit.
    Accepts one (N, 2) ring or a list of rings (evaluated together under even-odd).
    """
    if isinstance(rings, np.ndarray) and rings.ndim == 2:
        rings = [rings]
    out = np.zeros((height, width + 1), dtype=np.int32)
    xs, rows = [], []
    for ring in rings:
        p = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(p) < 3:
            continue
        q = np.roll(p, -1, axis=0)
        lo = np.minimum(p[:, 1], q[:, 1])
        hi = np.maximum(p[:, 1], q[:, 1])
        # Rows whose centre y = r + 0.5 lies in [lo, hi): half-open, so shared vertices count once.
        first = np.clip(np.ceil(lo - 0.5).astype(np.int64), 0, height)
        stop = np.clip(np.ceil(hi - 0.5).astype(np.int64), 0, height)
        counts = np.maximum(stop - first, 0)
        total = int(counts.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(p)), counts)
        row = np.repeat(first, counts) + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        y = row + 0.5
        t = (y - p[edge, 1]) / (q[edge, 1] - p[edge, 1])
        xs.append(p[edge, 0] + t * (q[edge, 0] - p[edge, 0]))
        rows.append(row)
    if not xs:
        return np.zeros((height, width), dtype=bool)
    x = np.concatenate(xs)
    row = np.concatenate(rows)
    order = np.lexsort((x, row))
    x, row = x[order], row[order]
    # Pixels c with centre c + 0.5 in [x_start, x_end).
    start = np.clip(np.ceil(x[0::2] - 0.5).astype(np.int64), 0, width)
    end = np.clip(np.ceil(x[1::2] - 0.5).astype(np.int64), 0, width)
    r = row[0::2]
    np.add.at(out, (r, start), 1)
    np.add.at(out, (r, end), -1)
    return np.cumsum(out, axis=1)[:, :width] > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union
