"""Polygon conversion benchmark: fidelity, vertex counts and time, ours vs the naive reference.

Ours: backend.geometry.mask_to_polygons (pixel-corner outlines, size-adaptive simplification, keyhole
holes) exported with to_percent (3 decimals). Reference, in the same run on the same masks: what
most pre-labelers do - cv2 contours on pixel centres, fixed-eps Douglas-Peucker, x / W * 100.
Fidelity = IoU between the mask and the rasterised polygons read back from the percent points
(pixel in <=> its centre is inside, Label Studio's frame: the image spans [0, W]).

Run standalone: .venv/bin/python -m benchmarks.bench_polygons   (writes docs/benchmarks/polygons.md)
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from backend import geometry

FRAME_W, FRAME_H = 1920, 1080
NAIVE_EPS = 2.0


# ---------------------------------------------------------------- synthetic human-part-like masks

def _smooth_blob(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A blob with a soft, wavy outline like an upsampled network mask."""
    small = rng.random((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w]
    centre = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    return (field - 0.6 * centre) > 0.15


def _limb(rng, canvas, length, width):
    h, w = canvas.shape
    x0, y0 = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    angle = rng.uniform(0, 2 * np.pi)
    pts = [(x0, y0)]
    for _ in range(rng.integers(1, 3)):  # upper arm + forearm, sometimes a hand
        angle += rng.uniform(-0.9, 0.9)
        x0, y0 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        pts.append((x0, y0))
    cv2.polylines(canvas, [np.round(np.array(pts)).astype(np.int32)], False, 1, max(1, int(width)))


def make_masks(count: int = 240, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Varied part masks on a 1920x1080 frame: sizes from specks to coats, split parts, holes, borders."""
    rng = np.random.default_rng(seed)
    kinds = ["ellipse", "limb", "blob", "split", "holes", "hair", "thin", "tiny", "border"]
    masks = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        m = np.zeros((FRAME_H, FRAME_W), np.uint8)
        size = float(np.exp(rng.uniform(np.log(12), np.log(600))))
        cx, cy = rng.uniform(0.15, 0.85) * FRAME_W, rng.uniform(0.15, 0.85) * FRAME_H
        if kind == "ellipse":        # faces, heads
            cv2.ellipse(m, (int(cx), int(cy)), (int(size / 2), int(size / 2 * rng.uniform(0.5, 1.4))),
                        rng.uniform(0, 180), 0, 360, 1, -1)
        elif kind == "limb":         # arms, legs: thick bent lines
            _limb(rng, m, size, max(3, size * rng.uniform(0.12, 0.35)))
        elif kind == "blob":         # clothes with soft wavy outlines
            bh, bw = int(size), int(size * rng.uniform(0.5, 1.5))
            y, x = int(cy - bh / 2), int(cx - bw / 2)
            blob = _smooth_blob(rng, bh, bw, rng.uniform(8, 40))
            y0, x0 = max(y, 0), max(x, 0)
            sub = blob[y0 - y:y0 - y + FRAME_H - y0, x0 - x:x0 - x + FRAME_W - x0]
            m[y0:y0 + sub.shape[0], x0:x0 + sub.shape[1]] = sub
        elif kind == "split":        # occluded part: two or three pieces (shoes, a leg behind an object)
            for _ in range(rng.integers(2, 4)):
                ox, oy = rng.normal(0, size, 2)
                cv2.ellipse(m, (int(cx + ox), int(cy + oy)), (int(size / 3) + 2, int(size / 5) + 2),
                            rng.uniform(0, 180), 0, 360, 1, -1)
        elif kind == "holes":        # upper clothes with an arm crossing in front, buttons, logos
            cv2.ellipse(m, (int(cx), int(cy)), (int(size / 2) + 8, int(size * 0.7) + 8), 0, 0, 360, 1, -1)
            canvas = np.zeros_like(m)
            cv2.ellipse(canvas, (int(cx), int(cy)), (int(size / 5) + 2, int(size / 9) + 2),
                        rng.uniform(0, 180), 0, 360, 1, -1)
            for _ in range(rng.integers(0, 4)):
                ox, oy = rng.uniform(-0.3, 0.3, 2) * size
                cv2.circle(canvas, (int(cx + ox), int(cy + oy)), int(rng.uniform(1, 0.06 * size + 2)), 1, -1)
            m[canvas > 0] = 0
        elif kind == "hair":         # hair around a face: a crescent or a ring
            cv2.ellipse(m, (int(cx), int(cy)), (int(size / 2) + 4, int(size / 2) + 4), 0, 0, 360, 1, -1)
            cv2.ellipse(m, (int(cx), int(cy + size * rng.uniform(0.0, 0.3))),
                        (int(size * 0.38) + 1, int(size * 0.42) + 1), 0, 0, 360, 0, -1)
        elif kind == "thin":         # straps, 1-3 px wide
            _limb(rng, m, size, rng.integers(1, 4))
        elif kind == "tiny":         # specks and small parts (sunglasses far away)
            r = rng.uniform(1.5, 6)
            cv2.ellipse(m, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.5, 1.5))), 0, 0, 360, 1, -1)
        elif kind == "border":       # parts cut by the frame
            cv2.ellipse(m, (int(rng.choice([0, FRAME_W - 1])), int(cy)), (int(size / 2) + 2, int(size / 2) + 2),
                        0, 0, 360, 1, -1)
        mask = m.astype(bool)
        if mask.any():
            masks.append((kind, mask))
    return masks


def make_parsing_masks(seed: int = 1) -> list[np.ndarray]:
    """~20 part masks of one crowded 1920x1080 parsing (3 people), for the per-image time."""
    masks = make_masks(count=9 * 3, seed=seed)
    return [m for _, m in masks][:20]


# ---------------------------------------------------------------- the two converters

def ours(mask: np.ndarray, min_pixels: int = 1) -> list[list[list[float]]]:
    return [geometry.to_percent(r, FRAME_W, FRAME_H, 3)
            for r in geometry.mask_to_polygons(mask, detail=1.0, min_pixels=min_pixels)]


def naive(mask: np.ndarray) -> list[list[list[float]]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        approx = cv2.approxPolyDP(c, NAIVE_EPS, True).reshape(-1, 2)
        if len(approx) >= 3:
            out.append([[x / FRAME_W * 100, y / FRAME_H * 100] for x, y in approx.tolist()])
    return out


def fidelity(mask: np.ndarray, polygons: list[list[list[float]]]) -> float:
    drawn = np.zeros_like(mask)
    for pts in polygons:
        drawn |= geometry.rasterise(geometry.from_percent(pts, FRAME_W, FRAME_H), FRAME_W, FRAME_H)
    return geometry.iou(mask, drawn)


@dataclass
class Run:
    name: str
    ious: np.ndarray
    vertices: np.ndarray      # per ring
    regions: int
    seconds: np.ndarray       # per mask


def measure(name, convert, masks) -> Run:
    ious, verts, secs, regions = [], [], [], 0
    for _, m in masks:
        t0 = time.process_time()
        polys = convert(m)
        secs.append(time.process_time() - t0)
        ious.append(fidelity(m, polys))
        verts.extend(len(p) for p in polys)
        regions += len(polys)
    return Run(name, np.array(ious), np.array(verts), regions, np.array(secs))


def hole_policy(masks) -> dict[str, tuple[float, float, float]]:
    """Masks with holes: keyhole bridges (ours) vs filling every hole. (median IoU, p5 IoU, mean vertices)."""
    with_holes = [m for _, m in masks if any(c.holes for c in geometry.trace_components(m))]
    fill_rows, bridge_rows = [], []
    for m in with_holes:
        comps = [c for c in geometry.trace_components(m) if c.area >= 1]
        bridged = geometry.mask_to_polygons(m, 1.0, 1)
        filled = [geometry.simplify_ring(c.outer, geometry.ring_tolerance(c.area, 1.0)) for c in comps]
        for rows, rings in ((bridge_rows, bridged), (fill_rows, filled)):
            drawn = np.zeros_like(m)
            for r in rings:
                drawn |= geometry.rasterise(r, FRAME_W, FRAME_H)
            rows.append((geometry.iou(m, drawn), np.mean([len(r) for r in rings])))
    out = {}
    for name, rows in (("keyhole bridges (ours)", bridge_rows), ("fill every hole", fill_rows)):
        a = np.array(rows)
        out[name] = (float(np.median(a[:, 0])), float(np.percentile(a[:, 0], 5)), float(a[:, 1].mean()))
    out["_count"] = (len(with_holes), 0, 0)
    return out


def brush_rle_times(masks, repeats: int = 3) -> tuple[float, float, bool]:
    """Median ms per 1920x1080 mask: our RLE encoder vs the SDK's mask2rle; and whether bytes match."""
    from label_studio_sdk.converter.brush import mask2rle

    from backend.ls_results import brush_rle

    ours_t, sdk_t, same = [], [], True
    for m in masks:
        for _ in range(repeats):
            t0 = time.process_time()
            a = brush_rle(m)
            t1 = time.process_time()
            b = mask2rle(m.astype(np.uint8) * 255)
            t2 = time.process_time()
            ours_t.append(t1 - t0)
            sdk_t.append(t2 - t1)
        same &= a == b
    return float(np.median(ours_t)) * 1e3, float(np.median(sdk_t)) * 1e3, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=240)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "polygons.md"))
    args = ap.parse_args()
    cv2.setNumThreads(1)

    masks = make_masks(args.masks)
    runs = [measure("ours (corners, adaptive eps, keyholes)", ours, masks),
            measure(f"naive (centres, eps={NAIVE_EPS:g} px, x/W*100)", naive, masks)]

    parsing = make_parsing_masks()
    per_image = {}
    for name, convert in (("ours", ours), ("naive", naive)):
        times = []
        for _ in range(5):
            t0 = time.process_time()
            for m in parsing:
                convert(m)
            times.append(time.process_time() - t0)
        per_image[name] = float(np.median(times))
    holes = hole_policy(masks)
    rle_ours, rle_sdk, rle_same = brush_rle_times(parsing[:8])

    kinds = sorted({k for k, _ in masks})
    lines = [
        "## Polygon conversion (mask -> Label Studio polygons)",
        "",
        f"`benchmarks/bench_polygons.py`: {len(masks)} synthetic human-part masks on a {FRAME_W}x{FRAME_H} frame "
        f"({', '.join(kinds)}), both converters on the same masks in one run "
        f"(Python {platform.python_version()}, OpenCV {cv2.__version__}, 1 thread; times are this process's CPU time, "
        "which the shared machine's load disturbs less than wall time). "
        "IoU = mask vs the polygons read back from their percent points and rasterised at pixel centres.",
        "",
        "| converter | median IoU | p5 IoU | min IoU | regions | vertices/ring median | p95 | max | ms/mask median | ms/mask p95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.name} | {np.median(r.ious):.4f} | {np.percentile(r.ious, 5):.4f} | {r.ious.min():.4f} | "
            f"{r.regions} | {np.median(r.vertices):.0f} | {np.percentile(r.vertices, 95):.0f} | {r.vertices.max()} | "
            f"{np.median(r.seconds) * 1e3:.2f} | {np.percentile(r.seconds, 95) * 1e3:.2f} |")
    ours_run, naive_run = runs
    lines += [
        "",
        f"Per {FRAME_W}x{FRAME_H} parsing ({len(parsing)} part masks, median of 5): ours "
        f"{per_image['ours'] * 1e3:.1f} ms, naive {per_image['naive'] * 1e3:.1f} ms "
        f"(ratio {per_image['ours'] / per_image['naive']:.2f}x).",
        "",
        "Median IoU per mask kind (ours / naive):",
        "",
        "| kind | masks | ours | naive |",
        "|---|---|---|---|",
    ]
    kind_of = np.array([k for k, _ in masks])
    for k in kinds:
        sel = kind_of == k
        lines.append(f"| {k} | {int(sel.sum())} | {np.median(ours_run.ious[sel]):.4f} | "
                     f"{np.median(naive_run.ious[sel]):.4f} |")
    n_holes = holes.pop("_count")[0]
    lines += ["", f"Hole policy on the {n_holes} masks with holes (one region per component either way):", "",
              "| policy | median IoU | p5 IoU | mean vertices/region |", "|---|---|---|---|"]
    for name, (med, p5, v) in holes.items():
        lines.append(f"| {name} | {med:.4f} | {p5:.4f} | {v:.0f} |")
    lines += ["", f"BrushLabels RLE per {FRAME_W}x{FRAME_H} mask (median over 8 masks x 3): ours "
              f"`backend.ls_results.brush_rle` {rle_ours:.2f} ms, SDK `mask2rle` {rle_sdk:.1f} ms "
              f"({rle_sdk / rle_ours:.0f}x); output byte-identical: {'yes' if rle_same else 'NO'}.", ""]
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
