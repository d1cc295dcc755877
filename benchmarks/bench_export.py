"""Export benchmark: time to turn Label Studio annotations into a training set, per 100 images at 1920x1080.

What is timed, per image: decoding the JPEG (as the export does after fetching it), reading the annotation's regions
(polygons filled in Label Studio's frame, or brush RLE decoded with the SDK's `decode_rle`), persons and overlaps
(compose), and writing the files (CIHP: image copy + 3 PNG maps + instance list; COCO: image copy + pycocotools RLE
per person-part). Not timed: Label Studio's API and the image download (network-bound, the same for any exporter).

Synthetic annotations: 3 persons per image (one polygon each), 6-7 parts each (ellipses and bent limbs that overlap
like a parsing does), converted to polygons by the backend's own `mask_to_polygons` and to brush RLE by
`brush_rle`, so the regions are exactly what pre-labels accepted as-is look like.

References measured in the same run, on the same regions: filling the polygons alone (our scanline fill), the same
polygons filled with PIL `ImageDraw.polygon` on a full-size canvas per region (what export scripts usually do; it
is not exact in Label Studio's frame, timed only as a yardstick), the SDK's brush decoding alone, and decoding the
JPEG alone. Order alternates between repeats, best of N is kept (the machine is shared and loaded).

Run standalone: .venv/bin/python -m benchmarks.bench_export   (writes docs/benchmarks/export.md and export.json)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from backend import geometry
from backend.export.brush import decode_brush
from backend.export.labels import build_class_map
from backend.export.raster import polygon_mask
from backend.export.run import ExportSummary, export_sample, make_writer
from backend.export.source import Item
from backend.images import decode_image
from backend.ls_results import brush_rle
from backend.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
W, H = 1920, 1080
PARTS = ["Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants", "Torso-skin",
         "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe", "Right-shoe"]


def _config(tag: str) -> str:
    labels = "".join(f'<Label value="{n}"/>' for n in PARTS + ["Human"])
    return f'<View><Image name="image" value="$image"/><{tag} name="parts" toName="image">{labels}</{tag}></View>'


def make_image(rng: np.random.Generator) -> bytes:
    """A 1920x1080 JPEG with smooth colour fields (compresses like a photo, unlike noise)."""
    small = (rng.random((9, 16, 3)) * 255).astype(np.uint8)
    img = cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_parsing(rng: np.random.Generator) -> list[tuple[str, int, np.ndarray]]:
    """(label, person, mask) for 3 persons and their parts; persons first, like the backend's results."""
    out = []
    parts = []
    for person in range(3):
        cx = int(W * (0.22 + 0.28 * person + rng.uniform(-0.04, 0.04)))
        body = np.zeros((H, W), np.uint8)
        cv2.ellipse(body, (cx, int(H * 0.55)), (int(W * 0.12), int(H * 0.42)), 0, 0, 360, 1, -1)
        out.append(("Human", person, body.astype(bool)))
        for k in range(int(rng.integers(6, 8))):
            m = np.zeros((H, W), np.uint8)
            x, y = cx + int(rng.normal(0, W * 0.05)), int(H * rng.uniform(0.2, 0.9))
            if k % 3 == 2:   # limbs: bent thick lines
                pts = np.array([(x, y), (x + rng.integers(-150, 150), y + rng.integers(40, 200)),
                                (x + rng.integers(-200, 200), y + rng.integers(100, 300))], np.int32)
                cv2.polylines(m, [pts], False, 1, int(rng.integers(15, 45)))
            else:
                cv2.ellipse(m, (x, y), (int(rng.integers(20, 160)), int(rng.integers(20, 200))),
                            float(rng.uniform(0, 180)), 0, 360, 1, -1)
            parts.append((str(rng.choice(PARTS)), person, m.astype(bool) & body.astype(bool)))
    parts.sort(key=lambda p: -int(p[2].sum()))
    return out + [p for p in parts if p[2].any()]


def polygon_result(parsing) -> list[dict]:
    result = []
    for i, (label, person, mask) in enumerate(parsing):
        for j, ring in enumerate(geometry.mask_to_polygons(mask, 1.0, 16)):
            result.append({"id": f"p{i}_{j}", "from_name": "parts", "to_name": "image", "type": "polygonlabels",
                           "original_width": W, "original_height": H, "image_rotation": 0, "meta": {"person": person},
                           "value": {"points": geometry.to_percent(ring, W, H, 3), "closed": True,
                                     "polygonlabels": [label]}})
    return result


def brush_result(parsing) -> list[dict]:
    return [{"id": f"b{i}", "from_name": "parts", "to_name": "image", "type": "brushlabels",
             "original_width": W, "original_height": H, "image_rotation": 0, "meta": {"person": person},
             "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]}}
            for i, (label, person, mask) in enumerate(parsing)]


def run_export(fmt: str, kind: str, samples, class_maps, out_root: Path) -> float:
    """Seconds (wall) to export all samples: decode image + regions + compose + write."""
    out = Path(tempfile.mkdtemp(prefix=f"{fmt}-{kind}-", dir=out_root))
    writer = make_writer(fmt, out, class_maps[kind].classes)
    summary = ExportSummary(format=fmt)
    max_pixels = get_settings().image_max_pixels
    t0 = time.perf_counter()
    for n, sample in enumerate(samples):
        image = decode_image(sample["jpeg"], max_pixels)
        item = Item(n + 1, n + 1, "", sample[kind], f"{n + 1:07d}")
        export_sample(writer, class_maps[kind], item, sample["jpeg"], image, "train", summary)
    writer.finish()
    elapsed = time.perf_counter() - t0
    assert not summary.skipped, summary.skipped[:3]
    return elapsed


def ref_fill_ours(samples) -> float:
    t0 = time.perf_counter()
    for s in samples:
        for r in s["polygons"]:
            polygon_mask(r["value"]["points"], W, H)
    return time.perf_counter() - t0


def ref_fill_pil(samples) -> float:
    t0 = time.perf_counter()
    for s in samples:
        for r in s["polygons"]:
            canvas = Image.new("L", (W, H), 0)
            ImageDraw.Draw(canvas).polygon([(x * W / 100, y * H / 100) for x, y in r["value"]["points"]], fill=1)
            np.asarray(canvas)
    return time.perf_counter() - t0


def ref_brush_decode(samples) -> float:
    t0 = time.perf_counter()
    for s in samples:
        for r in s["brush"]:
            decode_brush(r["value"]["rle"], W, H)
    return time.perf_counter() - t0


def ref_jpeg(samples) -> float:
    max_pixels = get_settings().image_max_pixels
    t0 = time.perf_counter()
    for s in samples:
        decode_image(s["jpeg"], max_pixels)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20, help="synthetic images per run (figures scaled to 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "export.md"))
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(args.images):
        parsing = make_parsing(rng)
        samples.append({"jpeg": make_image(rng), "polygons": polygon_result(parsing), "brush": brush_result(parsing)})
    settings = get_settings()
    class_maps = {"polygons": build_class_map(_config("PolygonLabels"), settings),
                  "brush": build_class_map(_config("BrushLabels"), settings)}
    n_poly = float(np.mean([len(s["polygons"]) for s in samples]))
    n_brush = float(np.mean([len(s["brush"]) for s in samples]))

    jobs = {
        "cihp, polygons": lambda d: run_export("cihp", "polygons", samples, class_maps, d),
        "coco, polygons": lambda d: run_export("coco", "polygons", samples, class_maps, d),
        "cihp, brush": lambda d: run_export("cihp", "brush", samples, class_maps, d),
        "coco, brush": lambda d: run_export("coco", "brush", samples, class_maps, d),
        "ref: fill polygons, ours (scanline)": lambda d: ref_fill_ours(samples),
        "ref: fill polygons, PIL ImageDraw per region": lambda d: ref_fill_pil(samples),
        "ref: decode brush RLE, SDK decode_rle": lambda d: ref_brush_decode(samples),
        "ref: decode JPEG": lambda d: ref_jpeg(samples),
    }
    best: dict[str, float] = {}
    names = list(jobs)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for rep in range(args.repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                seconds = jobs[name](Path(tmp))
                best[name] = min(best.get(name, float("inf")), seconds)
    per100 = {k: v / args.images * 100 for k, v in best.items()}
    jpeg = per100["ref: decode JPEG"]

    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    lines = [
        "## Export (Label Studio annotations -> CIHP layout / COCO)",
        "",
        f"`benchmarks/bench_export.py`: {args.images} synthetic 1920x1080 annotations (3 persons, "
        f"{n_poly:.0f} polygon regions or {n_brush:.0f} brush regions per image on average), figures scaled to "
        f"100 images; best of {args.repeats}, order alternating; Python {platform.python_version()}, "
        f"OpenCV 1 thread, MALLOC_*: {malloc or 'unset'}. Timed: JPEG decode + regions + persons/overlaps + "
        "writing the files to a local disk; not timed: Label Studio's API and the image download. "
        "The machine is shared and loaded: compare the ratios, not the seconds.",
        "",
        "| what | s per 100 images | ms per image | x JPEG decode |",
        "|---|---|---|---|",
    ]
    for name in names:
        lines.append(f"| {name} | {per100[name]:.1f} | {per100[name] * 10:.0f} | {per100[name] / jpeg:.1f} |")
    pil = per100["ref: fill polygons, PIL ImageDraw per region"]
    ours = per100["ref: fill polygons, ours (scanline)"]
    decode = per100["ref: decode brush RLE, SDK decode_rle"]
    lines += [
        "",
        f"Filling the polygons takes {ours / per100['cihp, polygons'] * 100:.0f}% of a polygon CIHP export; our "
        f"bounding-box scanline fill takes {ours / pil:.2f}x the time of PIL's C fill on a full canvas per region "
        "(and is exact in Label Studio's frame, which PIL is not). The rest of a polygon export is mostly PNG "
        "encoding (three 2-megapixel maps per image) and the overlap/person maps. Brush exports are dominated by "
        "the SDK's pure-Python RLE "
        f"decoder ({decode / per100['cihp, brush'] * 100:.0f}% of a brush CIHP export): a vectorised decoder is "
        "the obvious next step if brush projects get large.",
        "",
    ]
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"images": args.images, "repeats": args.repeats,
                                                    "seconds_per_100_images": per100,
                                                    "regions_per_image": {"polygons": n_poly, "brush": n_brush}},
                                                   indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
