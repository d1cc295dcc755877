"""Pre-label on import: time from a Label Studio import of N tasks to the last prediction stored, with 1 and 2 RQ
workers, in one run. Writes docs/benchmarks/webhooks.md (+ webhooks.json).

    .venv/bin/python -m benchmarks.bench_webhooks [--tasks 50] [--rounds 2]

A real Label Studio 1.23.2, a real redis-server and the real backend (`python _wsgi.py`) are started; the model
is connected to a fresh project per run (Label Studio then adds its /webhook hook), N tasks with N DISTINCT
images are imported in one request, and the clock runs from that request until Label Studio reports N
predictions (polled every 0.25 s). Every run has its own Redis database, so nothing is served from the cache:
each task is really parsed. The workers run 1 torch thread each (M2FP_THREADS=1, the compose default). The
model is the random-weight M2FP with its network input at short side 160 (testing/small_model.py): a real-size
input would make one run of 50 tasks take over half an hour on this shared 2-core machine; the ratio between
worker counts is the figure, not the absolute time. Configurations alternate (1, 2, 2, 1, ...); best of the
rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import requests

from testing.backend_server import start_backend
from testing.label_studio import connect_ml_backend, create_project, import_uploads, start_label_studio
from testing.random_model import make_sample_image
from testing.redis_server import RedisServer
from testing.small_model import small_input_model
from testing.workers import QUEUE, WorkerProcess, base_env

ROOT = Path(__file__).resolve().parents[1]
OUT_MD = ROOT / "docs" / "benchmarks" / "webhooks.md"
OUT_JSON = ROOT / "docs" / "benchmarks" / "webhooks.json"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="parts" toName="image">
    <Label value="Hair"/><Label value="Face"/><Label value="UpperClothes"/><Label value="Pants"/>
  </PolygonLabels>
</View>"""


def make_images(folder: Path, count: int, run: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"run{run}-{i:03d}.jpg"
        make_sample_image(160, 120, seed=1000 * (run + 1) + i).save(path, quality=90)
        paths.append(path)
    return paths


def one_run(ls, redis: RedisServer, model: Path, workers: int, tasks: int, run: int, work: Path,
            log_dir: Path) -> dict:
    db = 1 + run  # a fresh database: no cached parsing, no queue left over
    url = redis.url_for(db)
    redis.flushdb(db)
    ls_env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token}
    backend = start_backend({"M2FP_MODEL": str(model), "REDIS_URL": url, "RQ_QUEUE": QUEUE, "LOG_LEVEL": "WARNING",
                             **ls_env}, log_dir)
    env = {**base_env(model, cache_url=url), **ls_env, "LOG_LEVEL": "WARNING"}
    procs = [WorkerProcess(f"bench-{run}-{i}-{os.getpid()}", url, env, log_dir) for i in range(workers)]
    try:
        for proc in procs:
            proc.wait_ready(redis.client(db), timeout=300)
        project_id = create_project(ls, CONFIG)
        connect_ml_backend(ls, project_id, backend.url)
        paths = make_images(work / f"run{run}", tasks, run)
        start = time.perf_counter()
        import_uploads(ls, project_id, paths)
        import_s = time.perf_counter() - start
        deadline = time.monotonic() + 3600
        stored = 0
        while time.monotonic() < deadline:
            stored = ls.api("GET", f"/api/projects/{project_id}/").json()["total_predictions_number"]
            if stored >= tasks:
                break
            time.sleep(0.25)
        elapsed = time.perf_counter() - start
        status = requests.get(f"{backend.url}/projects/{project_id}/status", timeout=30).json()
    finally:
        for proc in procs:
            proc.stop()
        backend.stop()
    if stored != tasks or status["failed"]:
        raise RuntimeError(f"run {run}: {stored}/{tasks} predictions, status {status}")
    return {"workers": workers, "tasks": tasks, "import_request_s": round(import_s, 3),
            "import_to_last_prediction_s": round(elapsed, 2), "per_hour": round(tasks / elapsed * 3600)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    model = small_input_model()
    order = []
    for r in range(args.rounds):
        order.extend([1, 2] if r % 2 == 0 else [2, 1])
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        work = Path(tmp)
        ls = start_label_studio(work / "ls")
        redis = RedisServer(work / "redis")
        redis.start()
        try:
            for run, workers in enumerate(order):
                result = one_run(ls, redis, model, workers, args.tasks, run, work, work / "logs")
                print(json.dumps(result), flush=True)
                runs.append(result)
        finally:
            redis.stop()
            ls.stop()
    best = {w: min((r for r in runs if r["workers"] == w), key=lambda r: r["import_to_last_prediction_s"])
            for w in (1, 2)}
    ratio = best[1]["import_to_last_prediction_s"] / best[2]["import_to_last_prediction_s"]
    OUT_JSON.write_text(json.dumps({"runs": runs, "best": best, "speedup_2_vs_1": round(ratio, 3)}, indent=1) + "\n")
    lines = [
        "## Pre-label on import (webhook -> RQ workers)",
        "",
        f"Time from one Label Studio import of {args.tasks} tasks ({args.tasks} distinct 160x120 images, nothing "
        "cached) to the last prediction stored, through Label Studio's TASKS_CREATED webhook, the backend's queue "
        "and N `m2fp-prelabel worker` processes (1 torch thread each) posting through Label Studio's API. Real "
        "Label Studio 1.23.2, redis-server and backend in the same run; random-weight model with its network "
        "input at short side 160 (testing/small_model.py), so the ratio is the figure, not the seconds. "
        f"Order alternated ({', '.join(map(str, order))} workers), best of {args.rounds} per configuration. The "
        "machine is shared with other work (2 cores, load from other sessions): absolute times are noisy. "
        "`MALLOC_*` unset.",
        "",
        "| workers | import request | import -> last prediction | tasks/hour |",
        "|---|---|---|---|",
    ]
    for w in (1, 2):
        b = best[w]
        lines.append(f"| {w} | {b['import_request_s']:.2f} s | {b['import_to_last_prediction_s']:.1f} s | "
                     f"{b['per_hour']} |")
    lines += [
        "",
        f"**2 workers vs 1: {ratio:.2f}x faster** from import to the last prediction. The import request itself "
        "includes Label Studio's synchronous webhook call (the backend queues the tasks and answers; Label "
        "Studio gives it 1 s) and the upload of the files.",
        "",
    ]
    OUT_MD.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
