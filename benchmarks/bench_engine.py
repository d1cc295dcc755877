"""Engine benchmark: native engine vs the OFFICIAL modelscope pipeline, same model folder, same images.

Every figure comes from its own process (one process = one engine x one image x one allocator setting),
2 threads, median of --repeat runs after --warmup untimed runs inside a process, best (lowest median) of
--rounds rounds, the order of the sides alternating between rounds, all in one run of this script so
ratios compare like with like. Measured:
  - end-to-end parse time of a decoded RGB image (PIL) at 640x480 and 1920x1080: native vs official with
    the SAME allocator tuning (MALLOC_* environment = what the native engine applies to itself in-process
    with mallopt), and vs official as users run it (glibc defaults); optionally (--before REV) the native
    engine of an earlier git revision, so a change of the engine is measured against its predecessor;
  - peak RSS (getrusage ru_maxrss of that process: model load + warm-up + timed runs);
  - the network's FLOPs (torch.utils.flop_counter, 2 per multiply-add) at the 640x864 network input of a
    640x480 image, per stage (backbone, pixel decoder, transformer decoder; post-processing timed only) with
    each stage's GFLOP/s, next to this machine's measured fp32 peak (large matmul and 3x3 channels_last
    conv, same threads, same process);
  - the precisions of M2FP_PRECISION (HumanParser.from_pretrained(precision=...)): time and fidelity
    against the default fp32 output on the same image (mask IoU, score difference, same instances).

The official pipeline needs the reference venv (testing/reference/setup_env.sh). Model: the cached 'shaped'
random-weight folder of testing/random_model.py (full size, varied output).

    .venv/bin/python -m benchmarks.bench_engine [--repeat 3] [--warmup 1] [--rounds 2] [--threads 2]
                                                [--before REV] [--quick]
Writes docs/benchmarks/engine.md (+ engine.json with the raw figures); see benchmarks/run_all.py.
"""
from __future__ import annotations

import argparse
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
# Issue 13: native vs official with the same allocator tuning, the network's throughput at 640x864, and the
# end-to-end time of a 640x480 image.
SPEEDUP_TARGET = 2.0
GFLOPS_TARGET = 300.0
E2E_TARGET_S = 1.4
PRECISIONS = ("bf16",)


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
    """Per-stage FLOPs and time at the 640x480 image's network input, and the machine's fp32 peak."""
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from backend.engine import HumanParser, kernels
    from backend.engine.postprocess import parse_outputs
    from backend.engine.preprocess import prepare

    parser = HumanParser.from_pretrained(args.model, device="cpu", threads=args.threads)
    cfg = parser.config
    net = parser.network
    prep = prepare(Image.open(args.image).convert("RGB"), min_size=cfg.min_size, max_size=cfg.max_size,
                   size_divisibility=cfg.size_divisibility, mean=cfg.pixel_mean, std=cfg.pixel_std)
    x = prep.tensor
    head = net.sem_seg_head
    state: dict = {}

    def backbone() -> None:
        state["features"] = net.backbone(x.contiguous(memory_format=torch.channels_last)
                                          if net._channels_last else x)

    def pixel_decoder() -> None:
        state["mf"], state["ms"] = head.pixel_decoder(state["features"])

    def transformer_decoder() -> None:
        state["logits"], state["masks"] = head.predictor(state["ms"], state["mf"])

    def postprocess() -> None:
        parse_outputs(state["logits"][0], state["masks"][0], cfg, padded=(x.shape[2], x.shape[3]),
                      resized=prep.resized, original=prep.original)

    stages = {"backbone": backbone, "pixel_decoder": pixel_decoder,
              "transformer_decoder": transformer_decoder, "postprocess": postprocess}
    out: dict = {"stages": {}}
    with torch.inference_mode():
        # The flop counter knows aten convolutions, not oneDNN's fused one: count with the fused path off
        # (same convolutions, same FLOPs), time with it on.
        kernels._FUSED_CONV, fused = False, kernels._FUSED_CONV
        try:
            for name, fn in stages.items():
                counter = FlopCounterMode(display=False)
                with counter:
                    fn()
                out["stages"][name] = {"flops": counter.get_total_flops()}
        finally:
            kernels._FUSED_CONV = fused
        times: dict[str, list[float]] = {name: [] for name in stages}
        for i in range(args.warmup + args.repeat):
            for name, fn in stages.items():
                t = time.perf_counter()
                fn()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t)
        for name in stages:
            out["stages"][name]["s"] = statistics.median(times[name])
        out["network_flops"] = sum(v["flops"] for k, v in out["stages"].items() if k != "postprocess")
        out["network_s"] = _median_time(lambda: net(x), 1, args.repeat)
        # Machine peak with the same threads: a large fp32 matmul and a 3x3 conv (channels_last).
        a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
        mm_s = _median_time(lambda: a @ b, 1, 5)
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
        inp = torch.randn(1, 256, 160, 216).to(memory_format=torch.channels_last)
        conv_s = _median_time(lambda: conv(inp), 1, 5)
        # bf16 where the precision setting would run it; small sizes: without bf16 units it is very slow.
        a16, b16 = torch.randn(512, 512), torch.randn(512, 512)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mm16_s = _median_time(lambda: a16 @ b16, 1, 3)
            conv16_s = _median_time(lambda: conv(inp[:, :, :40, :54]), 1, 3)
    out.update({"bf16_matmul_gflops": 2 * 512**3 / mm16_s / 1e9,
                "bf16_conv_gflops": 2 * 256 * 256 * 9 * 40 * 54 / conv16_s / 1e9})
    out.update({"input_hw": list(x.shape[-2:]), "matmul_gflops": 2 * 4096**3 / mm_s / 1e9,
                "conv_gflops": 2 * 256 * 256 * 9 * 160 * 216 / conv_s / 1e9,
                "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "bf16_units": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())})
    return out


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
                 dump: Path | None = None, mode: str = "native", code_root: Path | None = None) -> dict:
    """One native measurement in a fresh process; `code_root` = a checkout whose `backend` package runs."""
    cmd = [sys.executable, "-m", "benchmarks.bench_engine", "--worker", mode, "--model", str(model),
           "--image", str(image), "--threads", str(a.threads), "--warmup", str(a.warmup),
           "--repeat", str(a.repeat), "--opts", json.dumps(opts or {})]
    if dump:
        cmd += ["--dump", str(dump)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)})
    if code_root is not None:
        # the other checkout's `backend` first, this checkout's `benchmarks` and `testing` after it
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), str(ROOT)])
    load0 = os.getloadavg()[0]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=code_root or ROOT)
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
    return {"times_s": entry["times_s"], "cpu_s": entry.get("cpu_s", []), "peak_rss_bytes": meta["peak_rss_bytes"],
            "load_s": meta["load_s"], "instances": len(entry["labels"]), "loadavg_before": load0,
            "malloc_env": meta["malloc_env"]}


def official_missing() -> str | None:
    """Why the official pipeline cannot run here (None when its reference venv is usable)."""
    from testing.reference.official import ReferenceEnvMissing, ref_python

    try:
        py = ref_python()
    except ReferenceEnvMissing as exc:
        return str(exc)
    probe = subprocess.run([str(py), "-c", "import modelscope, mmcv"], capture_output=True, text=True)
    if probe.returncode:
        return f"the reference venv cannot import modelscope/mmcv yet ({probe.stderr.strip().splitlines()[-1]})"
    return None


def previous_official(path: Path) -> dict | None:
    """The official-pipeline figures of the last run that measured them (kept when this run cannot)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if old.get("previous_official"):
        return old["previous_official"]
    try:
        sizes = {}
        for name, r in old["sizes"].items():
            pick = {side: (best(v) if isinstance(v, list) else v) for side, v in r.items()}
            sizes[name] = {side: med(pick[side]) for side in ("native", "official_tuned", "official_default")}
    except (KeyError, TypeError, ValueError):
        return None
    return {"started": old.get("started", "?"), "sizes": sizes}


def checkout(rev: str, dest: Path) -> Path:
    """`backend/` of git revision `rev` extracted into `dest` (for --before)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "backend"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


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


def best(rounds: list[dict]) -> dict:
    """The round with the lowest median (the least disturbed by other work on the machine)."""
    return min(rounds, key=med)


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def write_report(res: dict, a: argparse.Namespace) -> str:
    gb = 1000**3
    sides = [s for s in ("native", "before", "official_tuned", "official_default") if s in res["sizes"]["640x480"]]
    b = {name: {side: best(res["sizes"][name][side]) for side in sides} for name in SIZES}
    before = "before" in sides
    official = "official_tuned" in sides
    lines = ["## Engine: native M2FP vs the official modelscope pipeline", "",
             f"Model: random-weight full-size M2FP folder (`testing/random_model.py`, shaped variant, "
             f"63.1M parameters), synthetic images. {a.threads} threads; each engine x image x allocator in its "
             f"own process (median of {a.repeat} runs after {a.warmup} warm-up run(s)); best of {a.rounds} "
             f"rounds, the order of the sides reversed every round; all in one run ({res['started']}). "
             "Time = one call on a decoded RGB image, output masks at full size.", "",
             "Allocator settings: **native** - environment `MALLOC_*` unset; the engine tunes glibc in-process "
             "with `mallopt` (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD 1 GiB). "
             "**official (same allocator)** - `MALLOC_MMAP_THRESHOLD_=17179869184 "
             "MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824`, the same tuning through the "
             "environment. **official (default)** - `MALLOC_*` unset, glibc defaults, as users run it."
             + (f" **native before** - the engine at git revision `{res['before_rev']}` (before issue 13), "
                "same settings as native." if before else ""), ""]
    if not official:
        lines += [f"**The official pipeline was not measured in this run**: {res.get('official_missing')}. "
                  "The speed-up against it (target >= 2x with the same allocator) is therefore not shown here; "
                  "rerun `make bench` once the reference venv is built (`make ref-env`).", ""]
        prev = res.get("previous_official")
        if prev:
            lines += [f"Last measurement against the official pipeline ({prev['started']}, the engine before this "
                      "run's version, other run and machine load: not comparable with the seconds below):", "",
                      "| image | native then | official (same allocator) | speed-up | official (default) | speed-up |",
                      "|---|---|---|---|---|---|"]
            for name, r in prev["sizes"].items():
                lines.append(f"| {name} | {r['native']:.2f} s | {r['official_tuned']:.2f} s | "
                             f"{r['official_tuned'] / r['native']:.2f}x | {r['official_default']:.2f} s | "
                             f"{r['official_default'] / r['native']:.2f}x |")
            lines.append("")
        lines += ["This run:", ""]
    head = "| image | native |" + (" native before | speed-up vs before |" if before else "")
    if official:
        head += (" official (same allocator) | **speed-up** | official (default) | speed-up | "
                 "target: >= 2x same allocator |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name in SIZES:
        r = b[name]
        n = med(r["native"])
        row = f"| {name} | {n:.2f} s |"
        if before:
            row += f" {med(r['before']):.2f} s | {med(r['before']) / n:.2f}x |"
        if official:
            ot, od = med(r["official_tuned"]), med(r["official_default"])
            row += (f" {ot:.2f} s | **{ot / n:.2f}x** | {od:.2f} s | {od / n:.2f}x | "
                    f"{met(ot / n >= SPEEDUP_TARGET)} |")
        lines.append(row)
    ref_side = "official_tuned" if official else ("before" if before else None)
    if ref_side and all(r["native"].get("cpu_s") and r[ref_side].get("cpu_s") for r in b.values()):
        cpu = "; ".join(
            f"{name} {statistics.median(r[ref_side]['cpu_s']) / statistics.median(r['native']['cpu_s']):.2f}x"
            for name, r in b.items())
        what = "official (same allocator)" if official else "native before"
        lines += ["", f"Speed-up in CPU time (user+sys of the process during the call; less disturbed by other "
                      f"work than wall time), native vs {what}: {cpu}."]
    e2e = med(b["640x480"]["native"])
    lines += ["", f"End-to-end 640x480 (native, best round): {e2e:.2f} s; target <= {E2E_TARGET_S} s on a quiet "
                  f"machine: {met(e2e <= E2E_TARGET_S)}."]
    rss_sides = [s for s in ("native", "before", "official_tuned", "official_default") if s in sides]
    titles = {"native": "native", "before": "native before", "official_tuned": "official (same allocator)",
              "official_default": "official (default)"}
    lines += ["", "Peak RSS of each process (model load + warm-up + timed runs; `ru_maxrss`; best round):", "",
              "| image | " + " | ".join(titles[s] for s in rss_sides) + " | native limit |",
              "|---|" + "---|" * (len(rss_sides) + 1)]
    for name in SIZES:
        r = b[name]
        n = r["native"]["peak_rss_bytes"]
        lines.append(f"| {name} | " + " | ".join(f"{r[s]['peak_rss_bytes'] / gb:.2f} GB" for s in rss_sides)
                     + f" | <= 3 GB: {met(n <= RSS_LIMIT)} |")
    f = res["flops"]
    gflop = f["network_flops"] / 1e9
    achieved = gflop / f["network_s"]
    peak = max(f["matmul_gflops"], f["conv_gflops"])
    lines += ["", f"Network throughput (native, fp32, {f['threads']} threads, input {f['input_hw'][0]}x"
              f"{f['input_hw'][1]}, median of {a.repeat}; FLOPs counted by `torch.utils.flop_counter`, 2 per "
              "multiply-add; deformable sampling, norms and resizes not counted). Machine peak measured in the "
              f"same process: fp32 matmul 4096^3 {f['matmul_gflops']:.0f} GFLOP/s, fp32 3x3 conv (channels_last) "
              f"{f['conv_gflops']:.0f} GFLOP/s; torch CPU capability {f.get('cpu_capability', '?')}, "
              f"bf16 units (oneDNN): {'yes' if f.get('bf16_units') else 'no'}.", "",
              "| stage | FLOPs | time | achieved | fraction of best peak |", "|---|---|---|---|---|"]
    for name, st in f["stages"].items():
        g = st["flops"] / 1e9
        rate = f"{g / st['s']:.0f} GFLOP/s" if g else "-"
        frac = f"{g / st['s'] / peak:.0%}" if g else "-"
        lines.append(f"| {name.replace('_', ' ')} | {g:.0f} GFLOP | {st['s']:.2f} s | {rate} | {frac} |")
    lines.append(f"| **network** | {gflop:.0f} GFLOP | {f['network_s']:.2f} s | **{achieved:.0f} GFLOP/s** | "
                 f"{achieved / peak:.0%} |")
    h4, w4 = f["input_hw"][0] // 4, f["input_hw"][1] // 4
    skipped = 9 * 2 * 100 * 256 * h4 * w4 / 1e9   # dec_layers full-size (Q x C) x (C x H/4*W/4) mask products
    lines += ["", f"The official formulation also computes 9 intermediate full-resolution mask products "
                  f"({skipped:.0f} GFLOP at this input) that only feed the attention masks at 1/32-1/8 resolution; "
                  "this engine gets the same attention masks from resized mask features, so they are not counted.",
              "", f"FLOP lower bound at this machine's peak: {gflop / peak:.2f} s; the network takes "
                  f"{f['network_s'] / (gflop / peak):.2f}x that. Target >= {GFLOPS_TARGET:.0f} GFLOP/s: "
                  f"{met(achieved >= GFLOPS_TARGET)}"
              + (f" (unreachable here: {GFLOPS_TARGET:.0f} GFLOP/s is above this machine's measured peak of "
                 f"{peak:.0f})." if peak < GFLOPS_TARGET else ".")]
    if res.get("modes"):
        lines += ["", "Precisions (`M2FP_PRECISION`; native, same allocator, best round; fidelity against the default "
                  "fp32 output on the same image, instances matched by label + best IoU):", "",
                  "| precision | image | time | vs fp32 | min mask IoU | max score diff | same instances |",
                  "|---|---|---|---|---|---|---|",
                  "| fp32 (default, parity-tested against the official pipeline) | both | see above | 1.00x | 1 | 0 | yes |"]
        for mode, per in res["modes"].items():
            for name, m in per.items():
                base = med(b[name]["native"])
                lines.append(f"| {mode} | {name} | {med(m):.2f} s | {base / med(m):.2f}x | {m['min_iou']:.4f} | "
                             f"{m['max_dscore']:.1e} | {'yes' if m['same_instances'] else 'no'} |")
    for mode, why in res.get("modes_skipped", {}).items():
        lines += ["", f"Precision `{mode}` not run end to end: {why} (oneDNN reports no bf16 support). Measured in "
                      f"the same process: bf16 matmul {f['bf16_matmul_gflops']:.1f} GFLOP/s and bf16 3x3 conv "
                      f"{f['bf16_conv_gflops']:.1f} GFLOP/s vs fp32 {f['matmul_gflops']:.0f} / "
                      f"{f['conv_gflops']:.0f}, so `M2FP_PRECISION=bf16` would be far slower than fp32 here; the engine "
                      "logs a warning when it is asked for. On CPUs with bf16 units (AVX512-BF16 / AMX) this table "
                      "measures its speed and its fidelity against fp32."]
    lines += ["", "A CUDA device (`M2FP_DEVICE=cuda`) runs the same code in fp32 or under bf16 autocast; it is "
                  "unmeasured (no CUDA machine here). ONNX Runtime / OpenVINO were not added: the facts file "
                  "records that the ONNX export bakes in one padded input size and the dynamo exporter fails."]
    loads = [v["loadavg_before"] for s in res["sizes"].values() for rounds in s.values() for v in rounds]
    lines += ["", f"Noise: 1-min load average before each process {min(loads):.1f}-{max(loads):.1f} on "
              f"{res['machine']['cores']} cores ({res['machine']['cpu']}, torch {res['machine']['torch']}): other "
              "work (other people's test suites) shared the machine during this run and slows every side, unevenly; "
              "compare the ratios of one run, not absolute seconds across runs.", ""]
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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", metavar="REV", help="also time the native engine of this git revision")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 1 run, 1 round: checks the script, not figures")
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
        a.warmup, a.repeat, a.rounds = 1, 1, 1

    from testing.random_model import cached_model, make_sample_image
    from testing.reference.compare import compare_image, load_npz

    model = a.model or cached_model("shaped")
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                 "threads": a.threads, "warmup": a.warmup, "repeat": a.repeat, "rounds": a.rounds,
                 "sizes": {}, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        before_root = None
        if a.before:
            res["before_rev"] = a.before
            before_root = checkout(a.before, Path(tmp) / "before")
        images = {}
        for i, (name, (w, h)) in enumerate(SIZES.items()):
            images[name] = Path(tmp) / f"bench_{name}.jpg"
            make_sample_image(w, h, seed=i).save(images[name], quality=92)
        sides = {"native": lambda name, img: spawn_native(model, img, a, dump=Path(tmp) / f"native_{name}.npz")}
        missing = official_missing()
        if missing is None:
            sides["official_tuned"] = lambda name, img: run_official_timed(model, img, a, env=MALLOC_TUNED)
            sides["official_default"] = lambda name, img: run_official_timed(model, img, a, env={})
        else:
            print(f"[engine] official pipeline NOT measured: {missing}", flush=True)
            res["official_missing"] = missing
        if before_root is not None:
            sides["before"] = lambda name, img: spawn_native(model, img, a, code_root=before_root)
        order = list(sides)
        for rnd in range(a.rounds):
            for name, img in images.items():
                per = res["sizes"].setdefault(name, {})
                for side in (order if rnd % 2 == 0 else order[::-1]):
                    print(f"[engine] round {rnd + 1} {name}: {side}", flush=True)
                    per.setdefault(side, []).append(sides[side](name, img))
                print(f"[engine] round {rnd + 1} {name}: " + ", ".join(
                    f"{side} {med(per[side][-1]):.2f}s" for side in order), flush=True)
        print("[engine] network FLOPs per stage and machine peak", flush=True)
        res["flops"] = spawn_native(model, images["640x480"], a, mode="flops")
        for mode in PRECISIONS:
            if mode == "bf16" and not res["flops"]["bf16_units"]:
                # Without bf16 units, bf16 GEMMs run a reference kernel hundreds of times slower than fp32
                # (the flops worker measured it): a whole network would take many minutes per image.
                res["modes_skipped"] = {mode: "no bf16 units on this CPU"}
                continue
            res["modes"][mode] = {}
            for name, img in images.items():
                print(f"[engine] precision {mode} {name}", flush=True)
                dump = Path(tmp) / f"{mode}_{name}.npz"
                m = best([spawn_native(model, img, a, opts={"precision": mode}, dump=dump)
                          for _ in range(a.rounds)])
                rep = compare_image(name, load_npz(Path(tmp) / f"native_{name}.npz")[0], load_npz(dump)[0])
                m["min_iou"] = min((x.iou for x in rep.matches), default=1.0)
                m["max_dscore"] = max((abs(x.score_native - x.score_official) for x in rep.matches), default=0.0)
                m["same_instances"] = not any("instances" in p for p in rep.problems)
                res["modes"][mode][name] = m
    if "official_missing" in res:
        res["previous_official"] = previous_official(OUT_JSON)
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=1))
    OUT_MD.write_text(write_report(res, a))
    print(OUT_MD.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
