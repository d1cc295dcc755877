"""The whole M2FP network; `state_dict()` keys and shapes equal the hub checkpoint's, and loading is strict."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .backbone import DeepLabResNet
from .config import ModelConfig
from .pixel_decoder import PixelDecoder
from .transformer_decoder import MaskedTransformerDecoder

log = logging.getLogger(__name__)

WEIGHTS_FILE = "pytorch_model.pt"
# Training-only state the official loader also drops (Mask2Former's criterion buffer); never network weights.
IGNORED_PREFIXES = ("criterion.",)


class ModelLoadError(ValueError):
    """The checkpoint does not match the network the configuration describes (or cannot be read)."""


class M2FPHead(nn.Module):
    def __init__(self, pixel_decoder: PixelDecoder, predictor: MaskedTransformerDecoder) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


class M2FPNetwork(nn.Module):
    """images (N, 3, H, W) normalised and padded -> (pred_logits (N, Q, C+1), pred_masks (N, Q, H/4, W/4))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Non-persistent, as in modelscope: the checkpoint does not carry them.
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)
        self.backbone = DeepLabResNet(config.backbone)
        shapes = self.backbone.output_shape()
        pixel_decoder = PixelDecoder(shapes, config.encoder)
        predictor = MaskedTransformerDecoder(config.encoder.conv_dim, config.decoder)
        self.sem_seg_head = M2FPHead(pixel_decoder, predictor)
        self._channels_last = False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._channels_last:
            # Every stage keeps this layout: backbone maps, the pixel decoder's tokens and maps, the mask
            # features (tokens and channels_last maps share one memory layout, see pixel_decoder.py).
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(features)
        return self.sem_seg_head.predictor(multi_scale, mask_features)

    def prepare_for_inference(self, *, fold_norms: bool = True, channels_last: bool = False) -> "M2FPNetwork":
        """Eval mode; optionally fold BatchNorm into convolutions (keys change: call after loading) and
        store every convolution weight channels_last (the layout oneDNN computes in)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        if fold_norms:
            self.backbone.fold_norms()
        if channels_last:
            self.to(memory_format=torch.channels_last)
            self._channels_last = True
        return self


def build_network(config: ModelConfig) -> M2FPNetwork:
    """A randomly initialised M2FP network for `config` (load weights with `load_weights`)."""
    net = M2FPNetwork(config)
    _init_random(net)
    return net


@torch.no_grad()
def _init_random(net: nn.Module) -> None:
    # Deterministic-shape, finite values so that a freshly built network runs; real weights overwrite them.
    for name, p in net.named_parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raise ModelLoadError naming every missing, unexpected or mis-shaped key; return the loadable dict."""
    expected = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s): {_describe(misshaped)}")
    if problems:
        raise ModelLoadError("checkpoint does not match the network built from configuration.json: "
                             + "; ".join(problems))
    return state


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a hub checkpoint file ({'model': state_dict})."""
    try:
        try:
            # mmap: the weights are not held twice in memory while they are copied into the network
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} does not exist") from exc
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        return blob["model"]
    raise ModelLoadError(f"{path} must hold {{'model': state_dict}} like the hub checkpoint")


def load_weights(net: nn.Module, path: Path | str) -> None:
    """Strictly load `<path>` (the hub's pytorch_model.pt) into `net`."""
    state = check_state_dict(net, read_checkpoint(Path(path)))
    net.load_state_dict(state, strict=True)
