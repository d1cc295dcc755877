"""Memory benchmark: peak RSS of the served backend for 1 and 10 concurrent /predict requests, and for the largest
image the defaults accept (issue 8).

Each scenario runs on a FRESH server process (python _wsgi.py, threaded, the product's defaults:
MAX_CONCURRENT_INFERENCES=1, IMAGE_MAX_PIXELS), so its peak (VmHWM from /proc/<pid>/status) belongs to that
scenario alone; no Redis (every request runs the model). Images travel inside the request as data: URIs, so
the figures are the model's and the server's, not a download's.
- one:  one request, one different 1920x1080 image;
- ten:  10 requests at once, 10 different 1920x1080 images (10 request threads);
- ten, MAX_CONCURRENT_INFERENCES=10: the same with the limit lifted (what the server did before issue 8), as the
  in-run reference for what the dedicated inference thread saves;
- largest: one request with a photo-like image of exactly IMAGE_MAX_PIXELS pixels (square).
Targets: ten <= 1.3x one (peak RSS); the largest accepted image under 3 GB.

Allocator: the engine's own glibc tuning (backend/engine/parser.py tune_allocator: mmap threshold 1 GB, no trim,
1 GB top pad), no MALLOC_* variables; torch threads M2FP_THREADS (default 2). The machine is shared and loaded;
RSS does not depend on load as time does, but other processes can still change what the kernel reclaims.

Run standalone: .venv/bin/python -m benchmarks.bench_memory [--threads 2] [--skip-unlimited]
(writes docs/benchmarks/memory.md)
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from backend.settings import Settings
from testing.backend_server import start_backend
from testing.random_model import cached_model, make_sample_image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "memory.md"
WIDTH, HEIGHT = 1920, 1080
CONCURRENT = 10
CONFIG = ('<View><Image name="image" value="$image"/><PolygonLabels name="parts" toName="image">'
          '<Label value="Face"/><Label value="Hair"/><Label value="UpperClothes"/><Label value="Pants"/>'
          '<Label value="Left-arm"/><Label value="Right-arm"/></PolygonLabels></View>')


def data_uri(image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1])
    return out


def predict(url: str, image_uri: str, task_id: int) -> bool:
    answer = requests.post(url + "/predict", timeout=1800, json={
        "tasks": [{"id": task_id, "data": {"image": image_uri}}], "label_config": CONFIG, "project": "1.1"})
    answer.raise_for_status()
    return answer.json()["results"][0] != []


def scenario(model: Path, threads: int, images: list[str], env: dict[str, str], log_dir: Path) -> dict:
    server = start_backend({"M2FP_MODEL": str(model), "M2FP_THREADS": str(threads), **env}, log_dir,
                           threads=max(2, len(images)), startup_timeout=600)
    try:
        pid = server.proc.pid
        idle = rss_kb(pid)
        with ThreadPoolExecutor(len(images)) as pool:
            ok = list(pool.map(lambda a: predict(server.url, a[1], a[0]), enumerate(images)))
        after = rss_kb(pid)
        return {"idle_mb": idle["VmRSS"] / 1024, "peak_mb": after["VmHWM"] / 1024, "after_mb": after["VmRSS"] / 1024,
                "predictions": sum(ok), "requests": len(images)}
    finally:
        server.stop()


def glibc() -> str:
    try:
        return " ".join(platform.libc_ver())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--skip-unlimited", action="store_true", help="skip the MAX_CONCURRENT_INFERENCES=10 reference")
    args = cli.parse_args(argv)
    max_pixels = Settings().image_max_pixels
    side = int(max_pixels ** 0.5)
    model = cached_model("shaped")
    hd = [data_uri(make_sample_image(WIDTH, HEIGHT, seed=100 + i)) for i in range(CONCURRENT)]
    largest = data_uri(make_sample_image(side, side, seed=7))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    results: dict[str, dict] = {}
    plan = [("one", hd[:1], {}), ("ten", hd, {}), ("largest", [largest], {})]
    if not args.skip_unlimited:
        plan.append(("ten_unlimited", hd, {"MAX_CONCURRENT_INFERENCES": str(CONCURRENT)}))
    for name, images, env in plan:
        started = time.perf_counter()
        results[name] = scenario(model, args.threads, images, env, log_dir)
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name]), flush=True)

    one, ten, big = results["one"], results["ten"], results["largest"]
    ratio = ten["peak_mb"] / one["peak_mb"]
    rows = [("1 request, 1920x1080", one), (f"{CONCURRENT} concurrent requests, 10 different 1920x1080", ten)]
    if "ten_unlimited" in results:
        rows.append((f"{CONCURRENT} concurrent, `MAX_CONCURRENT_INFERENCES={CONCURRENT}` (reference: no limit)",
                     results["ten_unlimited"]))
    rows.append((f"1 request, {side}x{side} (= `IMAGE_MAX_PIXELS` {max_pixels:,})", big))
    lines = [
        "## Memory: peak server RSS per request pattern",
        "",
        f"Peak RSS (VmHWM) of the served backend (`python _wsgi.py`, a fresh process per row, random-weight full-size "
        f"model, CPU, `M2FP_THREADS={args.threads}`, no Redis: every request runs the model; images inside the "
        "request as `data:` URIs). Allocator: the engine's glibc tuning (`mallopt`: mmap threshold 1 GB, no trim, "
        f"1 GB top pad), no `MALLOC_*` variables; {glibc()}, Python {platform.python_version()}. The machine is "
        "shared and loaded; RSS does not depend on load as times do. `python -m benchmarks.bench_memory`.",
        "",
        "| scenario | RSS idle (model loaded) | peak RSS | RSS after | predictions |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['idle_mb']:.0f} MB | {r['peak_mb']:.0f} MB | {r['after_mb']:.0f} MB | "
                     f"{r['predictions']}/{r['requests']} |")
    lines += [
        "",
        f"- {CONCURRENT} concurrent / 1 request, peak RSS: **{ratio:.2f}x** (target <= 1.3x): requests wait for the "
        "one inference thread (`MAX_CONCURRENT_INFERENCES=1`) holding only their bytes.",
    ]
    if "ten_unlimited" in results:
        lines.append(f"- Without the limit the same {CONCURRENT} requests peak at "
                     f"**{results['ten_unlimited']['peak_mb'] / one['peak_mb']:.2f}x** the single request.")
    lines.append(f"- Largest accepted image ({side}x{side}): peak **{big['peak_mb'] / 1024:.2f} GiB** (target < 3 GB); "
                 "a larger one is refused from its header (`too_large`) before any pixel is decoded.")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    (OUT.with_suffix(".json")).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
