"""Write a random-weight M2FP model folder in exactly the hub's format (configuration.json + pytorch_model.pt).

Model hubs are unreachable in tests and CI, so every test and benchmark runs on a full-size (63.1M parameter)
network with random weights, loaded through the same code path as the real checkpoint. Random weights as they
are give an EMPTY parsing (every query's score is below 0.1), which proves nothing about post-processing; the
'shaped' variant therefore sets a few layers on purpose so the official pipeline returns several humans and
many part instances of many labels, with masks of very different sizes that follow the image content:

  score(query q, class c) = softmax(class_embed(d_q))[c] * mean(sigmoid(mask_q) over pixels where mask_q > 0)
  mask_q(x)              = mask_embed(d_q) . mask_features(x)

where d_q is the transformer decoder's (normed) output for query q. The recipe:
1. every weight gets PyTorch's default init under a fixed seed; BatchNorm statistics and affine parameters are
   randomised (so a missing or wrong BatchNorm breaks parity instead of being an identity);
2. the decoder's attention/FFN residual branches are scaled down so d_q is dominated by the query's own
   embedding (image content still moves it a little, which keeps those layers under test);
3. a calibration pass on synthetic images records the pixel decoder's last features y(x) and d_q;
4. `mask_features` (the 1x1 conv before the mask dot product) becomes a whitened projection of y on its main
   principal components plus one constant channel, so a mask is a half-space of PCA space: its area is set by
   a threshold taken from calibration quantiles, its sharpness (hence the mask score) by a gain;
5. the last mask_embed layer and class_embed are solved by ridge regression from the recorded d_q (through the
   untouched random first MLP layers) so each query gets a planned label distribution (a dominant part class,
   Human, background, two labels, or no-object) and a planned mask;
6. a final check runs the network again and refuses to write a model whose output is not varied.

The 'plain' variant keeps the default init except for a near-zero class head (all class probabilities ~1/22,
so every score is < 0.06 < 0.1): its output is empty for any image, the "nobody in the picture" case.

The tool needs only the product's venv (torch + backend.engine). CLI:
    python -m testing.random_model OUT_DIR [--variant shaped|plain] [--seed 0] [--config PATH]
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = Path(os.environ.get("M2FP_RANDOM_CONFIG", "/work/shared/m2fp/configuration.json"))
# A copy kept in the repo so a fresh clone (CI) does not depend on the shared folder.
REPO_CONFIG = ROOT / "testing" / "reference" / "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"
CONFIG_FILE = "configuration.json"
VARIANTS = ("shaped", "plain")

PRED = "sem_seg_head.predictor."
PIX = "sem_seg_head.pixel_decoder."


def default_config_path() -> Path:
    return REPO_CONFIG if REPO_CONFIG.exists() else DEFAULT_CONFIG


# ----------------------------------------------------------------------------------------------------------
# The plan: what each of the 100 queries should output.


@dataclass(frozen=True)
class QueryPlan:
    classes: tuple[int, ...]      # dominant class ids (empty = no-object query)
    logit: float                  # logit of the dominant class(es); no-object sits at 0, the rest below
    area: float                   # target mask area as a fraction of the image (calibration quantile)
    gain: float                   # mask logit scale: higher = sharper sigmoid = higher mask score


def make_plan(class_names: list[str], num_queries: int, rng: np.random.Generator) -> list[QueryPlan]:
    idx = {name: i for i, name in enumerate(class_names)}
    human = len(class_names) - 1
    big = ["UpperClothes", "Pants", "Coat", "Dress", "Skirt", "Torso-skin", "Left-leg", "Right-leg"]
    small = ["Face", "Hair", "Hat", "Glove", "Sunglasses", "Socks", "Scarf", "Left-arm", "Right-arm",
             "Left-shoe", "Right-shoe"]
    plans: list[QueryPlan] = []

    def add(classes: tuple[int, ...], area_range: tuple[float, float], logit_range=(1.5, 5.0)) -> None:
        plans.append(QueryPlan(classes, float(rng.uniform(*logit_range)),
                               float(np.exp(rng.uniform(np.log(area_range[0]), np.log(area_range[1])))),
                               float(rng.uniform(1.0, 5.0))))

    for _ in range(4):                                   # several people
        add((human,), (0.08, 0.35))
    for name in big:                                     # large parts, some labels twice
        add((idx[name],), (0.03, 0.2))
    for name in ["UpperClothes", "Pants", "Left-leg"]:
        add((idx[name],), (0.02, 0.12))
    for name in small:                                   # small parts, several instances of some labels
        add((idx[name],), (0.002, 0.03))
    for name in ["Face", "Face", "Hair", "Hair", "Left-arm", "Right-shoe", "Face"]:
        add((idx[name],), (0.002, 0.02))
    for _ in range(2):                                   # background queries (never output as parts)
        add((0,), (0.2, 0.5))
    add((idx["Coat"], idx["UpperClothes"]), (0.03, 0.1), (3.0, 3.5))   # one mask, two labels
    while len(plans) < num_queries:                      # the rest say "no object"
        add((), (0.01, 0.3), (4.0, 5.0))
    order = rng.permutation(len(plans))                  # planned queries spread over query indices
    return [plans[i] for i in order]


def class_targets(plans: list[QueryPlan], num_logits: int) -> np.ndarray:
    """Target logits (queries x classes+1); the last column is no-object."""
    t = np.full((len(plans), num_logits), -2.0)
    for q, p in enumerate(plans):
        if p.classes:
            t[q, -1] = 0.0
            for c in p.classes:
                t[q, c] = p.logit
        else:
            t[q, -1] = p.logit
    return t


# ----------------------------------------------------------------------------------------------------------
# Synthetic images (shared with the test fixtures: they are part of what the cache key covers).


def make_sample_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic photo-like RGB image: smooth background, a few textured figure-like blobs.

    Random-weight networks respond to texture and edges, not semantics: large smooth regions and
    textured blobs of different sizes make the shaped model produce masks of different sizes.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    # Background: a colour gradient plus low-frequency noise (upsampled coarse noise).
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        img[..., c] = 110 + 60 * (a * xx / width + b * yy / height) + 20 * d
    coarse = rng.normal(0, 1, (max(2, height // 64), max(2, width // 64), 3)).astype(np.float32)
    img += 25 * np.asarray(Image.fromarray(((coarse + 4) * 32).clip(0, 255).astype(np.uint8)).resize(
        (width, height), Image.BILINEAR), np.float32) / 128 - 25
    # Figures: vertical ellipses (body) with a head disc, each with its own colour and stripe texture.
    n = int(rng.integers(2, 5))
    for i in range(n):
        cx = width * (i + 0.5 + rng.uniform(-0.2, 0.2)) / n
        h = height * rng.uniform(0.35, 0.8)
        cy = height - h / 2 - rng.uniform(0, 0.1) * height
        w = h * rng.uniform(0.22, 0.35)
        body = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 < 1
        head = (xx - cx) ** 2 + (yy - (cy - h / 2 - w * 0.25)) ** 2 < (w * 0.3) ** 2
        colour = rng.uniform(0, 255, 3)
        period = rng.uniform(4, 20)
        stripes = 40 * np.sin(2 * np.pi * (yy * np.cos(i) + xx * np.sin(i)) / period)[..., None]
        img[body] = colour + stripes[body]
        img[head] = np.array([225, 180, 150]) + rng.normal(0, 8, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------------
# Network access (the product's engine; only module names and a forward pass are needed).


def build(config_path: Path) -> torch.nn.Module:
    from backend.engine.config import parse_config
    from backend.engine.network import build_network

    raw = json.loads(Path(config_path).read_text())
    return build_network(parse_config(raw)).eval()


def calibration_images(seed: int) -> list[torch.Tensor]:
    """Normalised, 32-padded input tensors of synthetic scenes (small sizes: the pass only needs statistics)."""
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    out = []
    for i, (w, h) in enumerate([(448, 320), (320, 448), (512, 288)]):
        img = np.asarray(make_sample_image(w, h, seed=1000 + seed * 10 + i), np.float32)
        out.append(((torch.from_numpy(img).permute(2, 0, 1) - mean) / std)[None])
    return out


def run_network(net: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward pass from a normalised padded batch. Hooks collect what the caller needs."""
    if hasattr(net, "sem_seg_head") and hasattr(net.sem_seg_head, "layers") and hasattr(net, "pixel_std"):
        # modelscope's M2FP (used while developing the recipe in the reference env): it normalises itself.
        img = x[0] * net.pixel_std + net.pixel_mean
        net({"batched_inputs": [{"image": img}]})
    else:
        net(x)


@dataclass
class Calibration:
    y: np.ndarray        # (pixels, C) pixel decoder features entering mask_features, all images stacked
    d: np.ndarray        # (images * queries, hidden) normed decoder output of the LAST layer


def calibrate(net: torch.nn.Module, images: list[torch.Tensor]) -> Calibration:
    mods = dict(net.named_modules())
    ys, ds = [], []
    last_d: list[torch.Tensor] = []
    h1 = mods[PIX + "mask_features"].register_forward_hook(
        lambda m, inp, out: ys.append(inp[0][0].flatten(1).T.detach().clone()))
    h2 = mods[PRED + "class_embed"].register_forward_hook(
        lambda m, inp, out: last_d.append(inp[0].reshape(-1, inp[0].shape[-1]).detach().clone()))
    try:
        with torch.inference_mode():
            for x in images:
                last_d.clear()
                run_network(net, x)
                ds.append(last_d[-1])
    finally:
        h1.remove()
        h2.remove()
    return Calibration(torch.cat(ys).double().numpy(), torch.cat(ds).double().numpy())


# ----------------------------------------------------------------------------------------------------------
# Shaping.


def randomise_norms(state: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """BatchNorm stats/affine away from identity (eval-mode BN is a per-channel affine map)."""
    for key in list(state):
        if not key.endswith("running_var"):
            continue
        base = key[: -len("running_var")]
        n = state[key].numel()
        var = torch.empty(n).uniform_(0.5, 2.0, generator=gen)
        state[base + "running_var"] = var
        state[base + "running_mean"] = torch.randn(n, generator=gen) * 0.1
        state[base + "weight"] = torch.empty(n).uniform_(0.6, 1.2, generator=gen) * var.sqrt()
        state[base + "bias"] = torch.randn(n, generator=gen) * 0.05


def damp_decoder_branches(state: dict[str, torch.Tensor], factor: float) -> None:
    """Scale the residual branches of the transformer decoder so each query's output stays its own."""
    for key in list(state):
        if not key.startswith(PRED + "transformer_"):
            continue
        if key.endswith("out_proj.weight") or key.endswith("out_proj.bias") or ".linear2." in key:
            state[key] = state[key] * factor


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Solve y ~ x @ W.T + b (W: out x in) with an L2 penalty on W."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc).T
    return w, ym - w @ xm


def mlp_hidden(state: dict[str, torch.Tensor], d: np.ndarray) -> np.ndarray:
    """Output of the first two (ReLU) layers of mask_embed: the input of the layer we solve."""
    h = d
    for i in (0, 1):
        w = state[f"{PRED}mask_embed.layers.{i}.weight"].double().numpy()
        b = state[f"{PRED}mask_embed.layers.{i}.bias"].double().numpy()
        h = np.maximum(h @ w.T + b, 0.0)
    return h


def shape_heads(state: dict[str, torch.Tensor], cal: Calibration, plans: list[QueryPlan],
                n_images: int, rng: np.random.Generator, n_pcs: int = 12) -> None:
    y = cal.y
    mu = y.mean(0)
    # Principal directions of the pixel features: the strongest, smoothest image structure.
    _, s, vt = np.linalg.svd(y - mu, full_matrices=False)
    k = min(n_pcs, vt.shape[0])
    sigma = s[:k] / np.sqrt(len(y))
    pcs = vt[:k] / sigma[:, None]                      # whitened: unit variance over calibration pixels
    mask_dim, in_dim = state[PIX + "mask_features.weight"].shape[:2]
    w_mf = np.zeros((mask_dim, in_dim))
    b_mf = np.zeros(mask_dim)
    w_mf[:k] = pcs
    b_mf[:k] = -pcs @ mu
    const = k                                          # channel `k` is the constant 1: the mask threshold
    b_mf[const] = 1.0
    # The other channels keep small random weights: they are in the mask dot product but barely move it.
    w_mf[k + 1:] = rng.normal(0, 0.02 / np.sqrt(in_dim), (mask_dim - k - 1, in_dim))
    state[PIX + "mask_features.weight"] = torch.tensor(w_mf, dtype=torch.float32).view(mask_dim, in_dim, 1, 1)
    state[PIX + "mask_features.bias"] = torch.tensor(b_mf, dtype=torch.float32)

    z = (y - mu) @ pcs.T                               # (pixels, k) whitened PCA coordinates
    decay = 1.0 / np.sqrt(1.0 + np.arange(k))         # favour the leading, smoother components
    targets = np.zeros((len(plans), mask_dim))
    for q, p in enumerate(plans):
        a = rng.normal(0, 1, k) * decay
        a /= np.linalg.norm(a)
        proj = z @ a
        thr = np.quantile(proj, 1.0 - p.area)
        targets[q, :k] = p.gain * a
        targets[q, const] = -p.gain * thr
    h = mlp_hidden(state, cal.d)
    w2, b2 = ridge(h, np.tile(targets, (n_images, 1)), lam=1e-2)
    state[PRED + "mask_embed.layers.2.weight"] = torch.tensor(w2, dtype=torch.float32)
    state[PRED + "mask_embed.layers.2.bias"] = torch.tensor(b2, dtype=torch.float32)

    n_logits = state[PRED + "class_embed.weight"].shape[0]
    wc, bc = ridge(cal.d, np.tile(class_targets(plans, n_logits), (n_images, 1)), lam=1e-2)
    state[PRED + "class_embed.weight"] = torch.tensor(wc, dtype=torch.float32)
    state[PRED + "class_embed.bias"] = torch.tensor(bc, dtype=torch.float32)


@dataclass
class Check:
    n_parts: int
    n_humans: int
    labels: set[int]
    areas: list[float]


def quick_parse(net: torch.nn.Module, x: torch.Tensor, num_parsing: int) -> Check:
    """The score rule of M2FP's parsing inference at network resolution: enough to judge the output's variety."""
    mods = dict(net.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [mods[PRED + "class_embed"].register_forward_hook(lambda m, i, o: got.__setitem__("cls", o)),
             mods[PRED + "mask_embed"].register_forward_hook(lambda m, i, o: got.__setitem__("emb", o)),
             mods[PIX + "mask_features"].register_forward_hook(lambda m, i, o: got.__setitem__("feat", o))]
    try:
        with torch.inference_mode():
            run_network(net, x)
    finally:
        for h in hooks:
            h.remove()
    cls = got["cls"].reshape(-1, got["cls"].shape[-1])
    masks = torch.einsum("qc,chw->qhw", got["emb"].reshape(cls.shape[0], -1), got["feat"][0])
    probs = F.softmax(cls, -1)[:, :-1]
    pos = (masks > 0).float().flatten(1)
    mscore = (masks.sigmoid().flatten(1) * pos).sum(1) / (pos.sum(1) + 1e-6)
    scores = probs * mscore[:, None]
    top, idx = scores.flatten().topk(100)
    q, c = idx // probs.shape[1], idx % probs.shape[1]
    keep = top >= 0.1
    parts = [(int(cc), float(pos[qq].mean())) for qq, cc, k in zip(q, c, keep) if k and 0 < cc < num_parsing]
    humans = [float(pos[qq].mean()) for qq, cc, k in zip(q, c, keep) if k and cc == num_parsing]
    return Check(len(parts), len(humans), {p[0] for p in parts}, [a for _, a in parts] + humans)


def make_state(config_path: Path, seed: int, variant: str) -> dict[str, torch.Tensor]:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = json.loads(Path(config_path).read_text())["model"]
    torch.manual_seed(seed)
    net = build(config_path)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if variant == "plain":
        # A near-zero class head: every (query, class) probability is ~1/22, so every score stays far below
        # the 0.1 cut-off whatever the masks are - the output is empty for any image, by construction.
        gen = torch.Generator().manual_seed(seed + 1)
        w = state[PRED + "class_embed.weight"]
        state[PRED + "class_embed.weight"] = torch.randn(w.shape, generator=gen) * 0.005
        state[PRED + "class_embed.bias"] = torch.zeros(w.shape[0])
        return state
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 2)
    randomise_norms(state, gen)
    damp_decoder_branches(state, 0.25)
    plans = make_plan(list(cfg["classes"]), int(cfg["decoder"]["num_queries"]), rng)
    images = calibration_images(seed)
    # Twice: the decoder's masked attention depends on the masks the first solution draws.
    for _ in range(2):
        net.load_state_dict(state, strict=True)
        shape_heads(state, calibrate(net, images), plans, len(images), np.random.default_rng(seed + 3))
    net.load_state_dict(state, strict=True)
    checks = [quick_parse(net, x, int(cfg["num_parsing"])) for x in images]
    for ch in checks:
        if ch.n_humans < 2 or ch.n_parts < 8 or len(ch.labels) < 5 or min(ch.areas) > 0.01:
            raise RuntimeError(f"shaped model output is not varied enough on a calibration image: {ch}")
    return state


def make_random_model(out_dir: Path | str, config_path: Path | str | None = None, seed: int = 0,
                      variant: str = "shaped") -> Path:
    """Write `configuration.json` + `pytorch_model.pt` ({'model': state_dict}) into out_dir; return out_dir."""
    config_path = Path(config_path) if config_path else default_config_path()
    out = Path(out_dir)
    state = make_state(config_path, seed, variant)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, out / CONFIG_FILE)
    torch.save({"model": state}, out / WEIGHTS_FILE)
    return out


def model_key(variant: str, seed: int = 0, config_path: Path | None = None) -> str:
    """Cache key: this tool's source + the configuration + seed + variant."""
    config_path = config_path or default_config_path()
    h = hashlib.sha256()
    for data in (Path(__file__).read_bytes(), Path(config_path).read_bytes(), f"{seed}:{variant}".encode()):
        h.update(hashlib.sha256(data).digest())
    return f"{variant}-{h.hexdigest()[:16]}"


def cache_root() -> Path:
    return Path(os.environ.get("M2FP_CACHE", Path.home() / ".cache" / "m2fp-prelabel")).expanduser()


def cached_model(variant: str = "shaped", seed: int = 0, config_path: Path | None = None) -> Path:
    """The model folder for (tool source, config, seed, variant), built once under $M2FP_CACHE/models/.

    A file lock makes concurrent test sessions wait for one build instead of building twice; the folder
    appears atomically (rename), so a killed build never leaves a half-written model behind.
    """
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / model_key(variant, seed, config_path)
    if (final / WEIGHTS_FILE).exists():
        return final
    with open(models / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / WEIGHTS_FILE).exists():
            tmp = models / f".tmp-{final.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            make_random_model(tmp, config_path, seed, variant)
            os.replace(tmp, final)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path, nargs="?", help="folder to write (default: the cache folder)")
    ap.add_argument("--variant", choices=VARIANTS, default="shaped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=None, help="configuration.json to build from")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.out_dir is None:
        print(cached_model(args.variant, args.seed, args.config))
    else:
        print(make_random_model(args.out_dir, args.config, args.seed, args.variant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
