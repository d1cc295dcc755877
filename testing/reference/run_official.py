"""Run the OFFICIAL modelscope M2FP pipeline on a model folder and images; dump its outputs and timings.

Runs ONLY in the reference venv (testing/reference/setup_env.sh): modelscope 1.40.2, mmcv-full built from
source, torchvision's PyPI wheel. Nothing of this file is imported by the product.

    ref-venv/bin/python testing/reference/run_official.py --model DIR --out result.npz IMG [IMG ...]
        [--threads 2] [--warmup 0] [--repeat 1]

Output (.npz, numpy only, read by testing/reference/compare.py in the product venv):
    meta        JSON string: {"images": [{"path", "width", "height", "labels", "scores", "times_s",
                "error"}], "peak_rss_bytes", "load_s", "threads", "malloc_env", "versions"}
    masks_<i>   np.packbits of the bool masks of image i, shape (n, height, width) flattened
An image the pipeline raises on is recorded with its "error" (type and message) and no masks, so a crash on
one image (e.g. nobody in it) is a finding of the harness, not a harness failure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def torchvision_import_workaround() -> None:
    """Make the CUDA build of torchvision importable on CPU-only torch.

    torchvision 0.28's `_C.so` links libc10_cuda and fails to load on the CPU torch wheel; its Python side
    then still registers fake kernels for `torchvision::nms`/`qnms`, which raises "operator ... does not
    exist". Defining the two op schemas first lets the import finish; the pipeline only uses transforms,
    never the compiled ops. This lives here, in the harness, and nowhere in the product.
    """
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when torchvision's own ops loaded
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive for the life of the process (the schemas vanish with it).
    globals()["_TORCHVISION_LIB"] = lib


def load_pipeline(model_dir: str):
    torchvision_import_workaround()
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    return pipeline(Tasks.image_segmentation, model=model_dir)


def check_loaded(pipe, model_dir: str) -> None:
    """modelscope loads with strict=False and only LOGS skipped keys: verify every weight really arrived."""
    import torch

    state = torch.load(Path(model_dir) / "pytorch_model.pt", map_location="cpu", weights_only=True)["model"]
    loaded = pipe.model.state_dict()
    missing = sorted(set(loaded) - set(state))
    differ = sorted(k for k in set(loaded) & set(state) if not torch.equal(loaded[k].cpu(), state[k]))
    unused = sorted(set(state) - set(loaded))
    if missing or differ or unused:
        raise RuntimeError(f"official model did not load the folder's weights: missing {missing[:5]}, "
                           f"different {differ[:5]}, unused {unused[:5]}")


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def versions() -> dict[str, str]:
    import torch

    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("modelscope", "mmcv", "torchvision"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="official modelscope M2FP pipeline -> npz")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs per image before the timed ones")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per image (outputs kept from the last)")
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_s = time.perf_counter() - t0
    check_loaded(pipe, args.model)

    meta: dict = {"images": [], "load_s": load_s, "threads": args.threads,
                  "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                  "versions": versions()}
    arrays: dict[str, np.ndarray] = {}
    for i, path in enumerate(args.images):
        # The pipeline gets a decoded PIL image, like the native engine in the parity test: file decoding
        # is not what is compared or timed.
        image = Image.open(path).convert("RGB")
        entry: dict = {"path": str(path), "width": image.width, "height": image.height, "labels": [],
                       "scores": [], "times_s": [], "error": None}
        try:
            for _ in range(args.warmup):
                pipe(image)
            for _ in range(args.repeat):
                t, c = time.perf_counter(), time.process_time()
                result = pipe(image)
                entry["times_s"].append(time.perf_counter() - t)
                # CPU seconds of this process: less sensitive than wall time to other work on a shared machine.
                entry.setdefault("cpu_s", []).append(time.process_time() - c)
            masks = np.array([np.asarray(m) > 0.5 for m in result["masks"]], dtype=bool).reshape(
                -1, image.height, image.width)
            entry["labels"] = [str(x) for x in result["labels"]]
            entry["scores"] = [float(x) for x in result["scores"]]
            arrays[f"masks_{i}"] = np.packbits(masks.reshape(-1))
        except Exception as exc:  # noqa: BLE001 - recorded per image: a crash is a result here
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=6)
        meta["images"].append(entry)
    meta["peak_rss_bytes"] = peak_rss_bytes()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
