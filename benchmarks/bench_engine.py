"""Engine benchmark: native engine vs the OFFICIAL modelscope pipeline, same model folder, same images.

Every figure comes from its own process (one process = one engine x one image x one allocator setting),
2 threads, median of --repeat runs after --warmup untimed runs, all in one run of this script so ratios
compare like with like. Measured:
  - end-to-end parse time of a decoded RGB image (PIL) at 640x480 and 1920x1080: native vs official as users
    run it (glibc allocator defaults) and vs official with the MALLOC_* tuning of the facts file (what the
    native engine applies to itself in-process with mallopt);
  - peak RSS (getrusage ru_maxrss of that process: model load + warm-up + timed runs);
  - the native network's achieved GFLOP/s (torch.utils.flop_counter, 2 FLOPs per multiply-add) at the
    640x864 network input of a 640x480 image, next to this machine's measured fp32 peak (large matmul and
    3x3 channels_last conv, same threads, same run);
  - opt-in modes of the engine (HumanParser.from_pretrained options), each with its time and its mask IoU /
    score difference against the default on the same image.

The official pipeline needs the reference venv (testing/reference/setup_env.sh). Model: the cached 'shaped'
random-weight folder of testing/random_model.py (full size, varied output).

    .venv/bin/python -m benchmarks.bench_engine [--repeat 5] [--warmup 1] [--threads 2] [--quick]
Writes docs/benchmarks/engine.md (+ engine.json with the raw figures); see benchmarks/run_all.py.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUT_MD = ROOT / "docs" / "benchmarks" / "engine.md"
OUT_JSON = ROOT / "docs" / "benchmarks" / "engine.json"
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                "MALLOC_TOP_PAD_": "1073741824"}
RSS_LIMIT = 3 * 1000**3
TARGETS = {"640x480": 1.5, "1920x1080": 2.0}


def peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------------------ workers
# Each runs in a fresh process and prints one JSON line.


def worker_native(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    from backend.engine import HumanParser
    from testing.reference.compare import dump_npz, from_parsing

    opts = json.loads(args.opts or "{}")
    t0 = time.perf_counter()
    parser = HumanParser.from_pretrained(args.model, device="cpu", threads=args.threads, **opts)
    load_s = time.perf_counter() - t0
    image = Image.open(args.image).convert("RGB")
    for _ in range(args.warmup):
        parser(image)
    times, cpu = [], []
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        parsing = parser(image)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if args.dump:
        dump_npz(args.dump, [from_parsing(parsing)], [str(args.image)])
    return {"times_s": times, "cpu_s": cpu, "peak_rss_bytes": peak_rss(), "load_s": load_s,
            "threads": torch.get_num_threads(),
            "instances": len(parsing.parts) + len(parsing.humans)}


def _median_time(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker_flops(args: argparse.Namespace) -> dict:
    """Network FLOPs and time at the 640x480 image's network input, and the machine's fp32 peak."""
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from backend.engine import HumanParser
    from backend.engine.preprocess import prepare

    parser = HumanParser.from_pretrained(args.model, device="cpu", threads=args.threads)
    cfg = parser.config
    x = prepare(Image.open(args.image).convert("RGB"), min_size=cfg.min_size, max_size=cfg.max_size,
                size_divisibility=cfg.size_divisibility, mean=cfg.pixel_mean, std=cfg.pixel_std).tensor
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            parser.network(x)
        flops = counter.get_total_flops()
        net_s = _median_time(lambda: parser.network(x), args.warmup, args.repeat)
        # Machine peak with the same threads: a large fp32 matmul and a 3x3 conv (channels_last).
        a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
        mm_s = _median_time(lambda: a @ b, 1, 5)
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
        inp = torch.randn(1, 256, 160, 216).to(memory_format=torch.channels_last)
        conv_s = _median_time(lambda: conv(inp), 1, 5)
    return {"input_hw": list(x.shape[-2:]), "network_flops": flops, "network_s": net_s,
            "matmul_gflops": 2 * 4096**3 / mm_s / 1e9,
            "conv_gflops": 2 * 256 * 256 * 9 * 160 * 216 / conv_s / 1e9,
            "threads": torch.get_num_threads()}


def worker_profile(args: argparse.Namespace) -> dict:
    """Where one parse spends its time (torch profiler, by module scope and by op): for diagnosis only."""
    import torch
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile, record_function

    from backend.engine import HumanParser
    from backend.engine.postprocess import parse_outputs
    from backend.engine.preprocess import prepare

    parser = HumanParser.from_pretrained(args.model, device="cpu", threads=args.threads)
    image = Image.open(args.image).convert("RGB")
    parser(image)
    cfg = parser.config
    net = parser.network
    stages = {}
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        with record_function("preprocess"):
            prep = prepare(image, min_size=cfg.min_size, max_size=cfg.max_size,
                           size_divisibility=cfg.size_divisibility, mean=cfg.pixel_mean, std=cfg.pixel_std)
        stages["preprocess"] = time.perf_counter() - t
        x = prep.tensor
        t = time.perf_counter()
        with record_function("backbone"):
            feats = net.backbone(x)
        stages["backbone"] = time.perf_counter() - t
        t = time.perf_counter()
        with record_function("pixel_decoder"):
            mf, ms = net.sem_seg_head.pixel_decoder(feats)
        stages["pixel_decoder"] = time.perf_counter() - t
        t = time.perf_counter()
        with record_function("transformer_decoder"):
            logits, masks = net.sem_seg_head.predictor(ms, mf)
        stages["transformer_decoder"] = time.perf_counter() - t
        t = time.perf_counter()
        with record_function("postprocess"):
            parse_outputs(logits[0], masks[0], cfg, padded=(x.shape[2], x.shape[3]), resized=prep.resized,
                          original=prep.original)
        stages["postprocess"] = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"stages_s": stages, "input_hw": list(x.shape[-2:]), "top_ops": table}


# ------------------------------------------------------------------------------------------ driver


def spawn_native(model: Path, image: Path, a: argparse.Namespace, opts: dict | None = None,
                 dump: Path | None = None, mode: str = "native") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_engine", "--worker", mode, "--model", str(model), "--image", str(image),
           "--threads", str(a.threads), "--warmup", str(a.warmup), "--repeat", str(a.repeat),
           "--opts", json.dumps(opts or {})]
    if dump:
        cmd += ["--dump", str(dump)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)})
    load0 = os.getloadavg()[0]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["loadavg_before"] = load0
    return out


def run_official_timed(model: Path, image: Path, a: argparse.Namespace, env: dict) -> dict:
    from testing.reference.compare import load_meta
    from testing.reference.official import run_official

    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()[0]
        out = run_official(model, [image], Path(tmp) / "o.npz", threads=a.threads, warmup=a.warmup,
                           repeat=a.repeat, env=env)
        meta = load_meta(out)
    entry = meta["images"][0]
    if entry["error"]:
        raise RuntimeError(f"official pipeline failed on {image}: {entry['error']}")
    return {"times_s": entry["times_s"], "cpu_s": entry.get("cpu_s", []), "peak_rss_bytes": meta["peak_rss_bytes"], "load_s": meta["load_s"],
            "instances": len(entry["labels"]), "loadavg_before": load0, "malloc_env": meta["malloc_env"]}


def fast_modes() -> dict[str, dict]:
    """Opt-in modes the engine offers (detected from HumanParser.from_pretrained's signature)."""
    from backend.engine import HumanParser

    params = inspect.signature(HumanParser.from_pretrained).parameters
    modes = {}
    if "channels_last" in params:
        modes["channels_last"] = {"channels_last": True}
    for name in ("precision", "dtype"):
        if name in params:
            modes["bf16"] = {name: "bf16" if name == "precision" else "bfloat16"}
    if "fast" in params:
        modes["fast"] = {"fast": True}
    return modes


def machine() -> dict:
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def med(r: dict) -> float:
    return statistics.median(r["times_s"])


def write_report(res: dict, a: argparse.Namespace) -> str:
    gb = 1000**3
    lines = ["## Engine: native M2FP vs the official modelscope pipeline", "",
             f"Model: random-weight full-size M2FP folder (`testing/random_model.py`, shaped variant, "
             f"63.1M parameters), synthetic images. {a.threads} threads, median of {a.repeat} runs after "
             f"{a.warmup} warm-up run(s), each engine x image x allocator in its own process, all in one run "
             f"({res['started']}). Time = one call on a decoded RGB image, output masks at full size.", "",
             "Allocator settings: **native** - environment `MALLOC_*` unset; the engine tunes glibc in-process "
             "with `mallopt` (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD 1 GiB). "
             "**official (default)** - `MALLOC_*` unset, glibc defaults, as users run it. "
             "**official (tuned)** - `MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 "
             "MALLOC_TOP_PAD_=1073741824`.", "",
             "Wall time is what users wait; CPU time (user+sys of the process during the call) is also shown "
             "because the machine is shared and other work inflates wall time unevenly between processes.", "",
             "| image | native | official (default) | speed-up | official (tuned) | speed-up | target (wall) | "
             "speed-up in CPU time (default / tuned) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in SIZES:
        r = res["sizes"][name]
        n, od, ot = med(r["native"]), med(r["official_default"]), med(r["official_tuned"])
        ok = "met" if od / n >= TARGETS[name] else "**missed**"
        cpu = "-"
        if r["native"].get("cpu_s") and r["official_default"].get("cpu_s"):
            cn = statistics.median(r["native"]["cpu_s"])
            cpu = (f"{statistics.median(r['official_default']['cpu_s']) / cn:.2f}x / "
                   f"{statistics.median(r['official_tuned']['cpu_s']) / cn:.2f}x")
        lines.append(f"| {name} | {n:.2f} s | {od:.2f} s | **{od / n:.2f}x** | {ot:.2f} s | {ot / n:.2f}x | "
                     f">= {TARGETS[name]}x: {ok} | {cpu} |")
    lines += ["", "Peak RSS of each process (model load + warm-up + timed runs; `ru_maxrss`):", "",
              "| image | native | official (default) | official (tuned) | native limit |", "|---|---|---|---|---|"]
    for name in SIZES:
        r = res["sizes"][name]
        n = r["native"]["peak_rss_bytes"]
        lines.append(f"| {name} | {n / gb:.2f} GB | {r['official_default']['peak_rss_bytes'] / gb:.2f} GB | "
                     f"{r['official_tuned']['peak_rss_bytes'] / gb:.2f} GB | <= 3 GB: "
                     f"{'met' if n <= RSS_LIMIT else '**missed**'} |")
    f = res["flops"]
    gflop = f["network_flops"] / 1e9
    achieved = gflop / f["network_s"]
    peak = max(f["matmul_gflops"], f["conv_gflops"])
    lines += ["", f"Network throughput (native, fp32, {f['threads']} threads, input {f['input_hw'][0]}x"
              f"{f['input_hw'][1]}; FLOPs counted by `torch.utils.flop_counter`, 2 per multiply-add; "
              "deformable sampling, norms and resizes not counted):", "",
              "| network FLOPs | network time | achieved | machine fp32 matmul 4096^3 | machine fp32 conv3x3 "
              "(channels_last) | fraction of best peak | lower bound at peak |", "|---|---|---|---|---|---|---|",
              f"| {gflop:.0f} GFLOP | {f['network_s']:.2f} s | {achieved:.0f} GFLOP/s | "
              f"{f['matmul_gflops']:.0f} GFLOP/s | {f['conv_gflops']:.0f} GFLOP/s | {achieved / peak:.0%} | "
              f"{gflop / peak:.2f} s |"]
    if res.get("modes"):
        lines += ["", "Opt-in modes (native, same allocator; IoU / score vs the default fp32 output on the "
                  "same image, instances matched by label + best IoU):", "",
                  "| mode | image | time | vs default | min mask IoU | max score diff | same instances |",
                  "|---|---|---|---|---|---|---|"]
        for mode, per in res["modes"].items():
            for name, m in per.items():
                base = med(res["sizes"][name]["native"])
                lines.append(f"| {mode} | {name} | {med(m):.2f} s | {base / med(m):.2f}x | {m['min_iou']:.4f} | "
                             f"{m['max_dscore']:.1e} | {'yes' if m['same_instances'] else 'no'} |")
    loads = [v["loadavg_before"] for s in res["sizes"].values() for v in s.values()]
    lines += ["", f"Noise: 1-min load average before each process {min(loads):.1f}-{max(loads):.1f} on "
              f"{res['machine']['cores']} cores ({res['machine']['cpu']}, torch {res['machine']['torch']}); "
              "other work on the machine slows both sides, compare ratios from one run.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["native", "flops", "profile"],
                    help="internal: one measurement in this process ('profile' prints where the time goes)")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 runs: checks the script, not figures")
    a = ap.parse_args(argv)
    if a.worker:
        if a.worker == "profile":
            out = worker_profile(a)
            print(out.pop("top_ops"))
            print(json.dumps(out))
            return 0
        out = worker_native(a) if a.worker == "native" else worker_flops(a)
        print(json.dumps(out))
        return 0
    if a.quick:
        a.warmup, a.repeat = 1, 2

    from testing.random_model import cached_model, make_sample_image
    from testing.reference.compare import compare_image, load_npz

    model = a.model or cached_model("shaped")
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                 "threads": a.threads, "warmup": a.warmup, "repeat": a.repeat, "sizes": {}, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = {}
        for i, (name, (w, h)) in enumerate(SIZES.items()):
            images[name] = Path(tmp) / f"bench_{name}.jpg"
            make_sample_image(w, h, seed=i).save(images[name], quality=92)
        for name, img in images.items():
            print(f"[engine] {name}: native", flush=True)
            r = {"native": spawn_native(model, img, a, dump=Path(tmp) / f"native_{name}.npz")}
            print(f"[engine] {name}: official (default allocator)", flush=True)
            r["official_default"] = run_official_timed(model, img, a, env={})
            print(f"[engine] {name}: official (MALLOC_* tuned)", flush=True)
            r["official_tuned"] = run_official_timed(model, img, a, env=MALLOC_TUNED)
            res["sizes"][name] = r
            print(f"[engine] {name}: native {med(r['native']):.2f}s official {med(r['official_default']):.2f}s "
                  f"/ tuned {med(r['official_tuned']):.2f}s", flush=True)
        print("[engine] network FLOPs and machine peak", flush=True)
        res["flops"] = spawn_native(model, images["640x480"], a, mode="flops")
        for mode, opts in fast_modes().items():
            res["modes"][mode] = {}
            for name, img in images.items():
                print(f"[engine] mode {mode} {name}", flush=True)
                dump = Path(tmp) / f"{mode}_{name}.npz"
                m = spawn_native(model, img, a, opts=opts, dump=dump)
                rep = compare_image(name, load_npz(Path(tmp) / f"native_{name}.npz")[0], load_npz(dump)[0])
                m["min_iou"] = min((x.iou for x in rep.matches), default=1.0)
                m["max_dscore"] = max((abs(x.score_native - x.score_official) for x in rep.matches), default=0.0)
                m["same_instances"] = not any("instances" in p for p in rep.problems)
                res["modes"][mode][name] = m
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=1))
    OUT_MD.write_text(write_report(res, a))
    print(OUT_MD.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
