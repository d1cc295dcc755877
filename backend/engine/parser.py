"""HumanParser: model folder or hub id -> loaded network; image -> Parsing."""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .config import ModelConfig, load_config
from .network import WEIGHTS_FILE, M2FPNetwork, build_network, load_weights
from .postprocess import parse_outputs
from .preprocess import ImageInput, load_rgb, prepare
from .source import ModelSource, resolve
from .types import Parsing

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "damo/cv_resnet101_image-multiple-human-parsing"
DEFAULT_MODEL_REVISION = "v1.0.1"
DEFAULT_CACHE_DIR = "~/.cache/m2fp"
ENGINE_VERSION = "1"   # bump when a change of this engine changes its output
PRECISIONS = ("fp32", "bf16")

_malloc_tuned = False


def tune_allocator() -> bool:
    """Keep glibc from returning and re-faulting the large activation buffers on every image.

    The same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_ (30-40% faster on this
    network, see the facts file); output is unchanged. A no-op where glibc's mallopt is absent.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
              and libc.mallopt(m_top_pad, 1 << 30))
    except (OSError, AttributeError):
        return False
    _malloc_tuned = bool(ok)
    return _malloc_tuned


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


class HumanParser:
    """Loaded M2FP human parser. Call it on an image to get a Parsing (see backend.engine docs)."""

    def __init__(self, network: M2FPNetwork, config: ModelConfig, source: ModelSource, weights_sha256: str,
                 device: torch.device, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.network = network
        self.precision = precision
        self.config = config
        self.source = source
        self.device = device
        self.weights_sha256 = weights_sha256
        self.classes: tuple[str, ...] = config.classes
        tag = source.revision or weights_sha256[:8]
        # Reduced precision changes the output, so it shows in the model_version Label Studio stores.
        self.version: str = f"{source.name}@{tag}" + ("" if precision == "fp32" else f"+{precision}")
        identity = {
            "precision": precision,
            "engine": ENGINE_VERSION,
            "model_id": source.model_id,
            "revision": source.revision,
            "weights_sha256": weights_sha256,
            "config": config.to_dict(),
        }
        self.fingerprint: str = hashlib.sha256(
            json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = DEFAULT_MODEL_ID, *,
                        revision: str = DEFAULT_MODEL_REVISION, device: str | torch.device | None = None,
                        threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                        connect_timeout: float = 5.0, channels_last: bool = True,
                        precision: str = "fp32") -> "HumanParser":
        """Load from a local model folder or a ModelScope model id (downloaded once into `cache_dir`).

        `precision="bf16"` (opt-in) runs the network under bfloat16 autocast: faster on CPUs with bf16
        units, but its output differs from the official fp32 pipeline (see docs/benchmarks.md).
        `connect_timeout` bounds the hub reachability check; `channels_last` is a layout choice only.

        Raises ModelNotAvailableError (no folder / hub unreachable and nothing cached), ConfigError
        (configuration.json) or ModelLoadError (checkpoint does not match the configuration).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if threads:
            torch.set_num_threads(int(threads))
        dev = _pick_device(device)
        tune_allocator()
        resolved = resolve(source, revision=revision, cache_dir=cache_dir or DEFAULT_CACHE_DIR,
                           connect_timeout=connect_timeout)
        config = load_config(resolved.path)
        weights = resolved.path / WEIGHTS_FILE
        network = build_network(config)
        load_weights(network, weights)
        network.prepare_for_inference(fold_norms=True, channels_last=channels_last)
        network.to(dev)
        if precision == "bf16" and dev.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("M2FP precision bf16 requested, but this CPU has no bf16 units: bf16 matrix products run "
                        "a slow reference kernel, expect it to be much slower than fp32 (see docs/benchmarks.md)")
        sha = _file_sha256(weights)
        log.info("loaded M2FP from %s on %s (weights %s)", resolved.path, dev, sha[:12])
        return cls(network, config, resolved, sha, dev, precision)

    @torch.inference_mode()
    def __call__(self, image: ImageInput) -> Parsing:
        """Parse one image: PIL.Image | np.ndarray (HxWx3 RGB uint8) | bytes | path. EXIF is applied first."""
        pil = load_rgb(image)
        cfg = self.config
        prepared = prepare(pil, min_size=cfg.min_size, max_size=cfg.max_size,
                           size_divisibility=cfg.size_divisibility, mean=cfg.pixel_mean, std=cfg.pixel_std)
        del pil
        x = prepared.tensor.to(self.device)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                logits, masks = self.network(x)
            logits, masks = logits.float(), masks.float()
        else:
            logits, masks = self.network(x)
        return parse_outputs(logits[0], masks[0], cfg, padded=(x.shape[2], x.shape[3]),
                             resized=prepared.resized, original=prepared.original)
