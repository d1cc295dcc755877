"""DeepLab-style ResNet (3-conv stem) as used by M2FP; module names mirror the hub checkpoint's keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig
from .kernels import conv2d_act

_BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_STAGE_INDEX = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}


def make_norm(kind: str | None, channels: int) -> nn.Module | None:
    if kind is None or kind == "":
        return None
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unsupported norm {kind!r}")


class NormConv2d(nn.Conv2d):
    """Conv2d with an optional norm (child `norm`, hence keys `<name>.norm.*`) and activation.

    `fold_norm()` merges an eval-mode BatchNorm into the convolution's weight and bias: the same affine map,
    one pass less over the activations. It changes state_dict keys, so it runs only after strict loading.
    With no norm left, ReLU and a residual add run fused into the convolution (kernels.py).
    """

    def __init__(self, *args, norm: nn.Module | None = None, relu: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.relu = relu

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None, relu: bool | None = None) -> torch.Tensor:
        """act(norm(conv(x)) [+ add]); `relu` overrides the module's own activation."""
        relu = self.relu if relu is None else relu
        if self.norm is None:
            return conv2d_act(self, x, relu=relu, add=add)
        x = self.norm(conv2d_act(self, x))
        if add is not None:
            x += add
        return F.relu_(x) if relu else x

    @torch.no_grad()
    def fold_norm(self) -> None:
        bn = self.norm
        if not isinstance(bn, nn.BatchNorm2d):
            return
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        self.weight.copy_(self.weight * scale.view(-1, 1, 1, 1))
        self.bias = nn.Parameter(bias.clone())
        self.norm = None


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int,
                 num_groups: int, norm: str, stride_in_1x1: bool, dilation: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = NormConv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                       norm=make_norm(norm, out_channels))
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = NormConv2d(in_channels, bottleneck_channels, kernel_size=1, stride=s1, bias=False,
                                norm=make_norm(norm, bottleneck_channels), relu=True)
        self.conv2 = NormConv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=s3,
                                padding=dilation, dilation=dilation, groups=num_groups, bias=False,
                                norm=make_norm(norm, bottleneck_channels), relu=True)
        self.conv3 = NormConv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                                norm=make_norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.conv3(self.conv2(self.conv1(x)), add=shortcut, relu=True)


class Stem(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        half = out_channels // 2
        self.out_channels = out_channels
        self.conv1 = NormConv2d(in_channels, half, kernel_size=3, stride=2, padding=1, bias=False,
                                norm=make_norm(norm, half), relu=True)
        self.conv2 = NormConv2d(half, half, kernel_size=3, padding=1, bias=False, norm=make_norm(norm, half),
                                relu=True)
        self.conv3 = NormConv2d(half, out_channels, kernel_size=3, padding=1, bias=False,
                                norm=make_norm(norm, out_channels), relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class DeepLabResNet(nn.Module):
    """Returns {name: feature} for the configured out_features; `output_shape()` gives channels and strides."""

    def __init__(self, cfg: BackboneConfig, in_channels: int = 3) -> None:
        super().__init__()
        if cfg.res4_dilation not in (1, 2) or cfg.res5_dilation not in (1, 2, 4):
            raise ValueError("res4_dilation must be 1 or 2 and res5_dilation 1, 2 or 4")
        self.stem = Stem(in_channels, cfg.stem_out_channels, cfg.norm)
        self.out_features = tuple(cfg.out_features)
        blocks_per_stage = _BLOCKS_PER_STAGE[cfg.depth]
        last_stage = max(_STAGE_INDEX[f] for f in self.out_features)
        in_ch, out_ch = cfg.stem_out_channels, cfg.res2_out_channels
        bott = cfg.num_groups * cfg.width_per_group
        stride = 4
        self.stage_names: list[str] = []
        self._shapes: dict[str, dict[str, int]] = {}
        for idx, stage_idx in enumerate(range(2, last_stage + 1)):
            dilation = {4: cfg.res4_dilation, 5: cfg.res5_dilation}.get(stage_idx, 1)
            first_stride = 1 if idx == 0 or dilation > 1 else 2
            n = blocks_per_stage[idx]
            if stage_idx == 5:
                if len(cfg.res5_multi_grid) != n:
                    raise ValueError(f"res5_multi_grid needs {n} entries, got {len(cfg.res5_multi_grid)}")
                dilations = [dilation * g for g in cfg.res5_multi_grid]
            else:
                dilations = [dilation] * n
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(in_ch if b == 0 else out_ch, out_ch, bottleneck_channels=bott,
                                         stride=first_stride if b == 0 else 1, num_groups=cfg.num_groups,
                                         norm=cfg.norm, stride_in_1x1=cfg.stride_in_1x1, dilation=dilations[b]))
            name = f"res{stage_idx}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            stride *= first_stride
            self._shapes[name] = {"channels": out_ch, "stride": stride}
            in_ch, out_ch, bott = out_ch, out_ch * 2, bott * 2

    def output_shape(self) -> dict[str, dict[str, int]]:
        return {name: self._shapes[name] for name in self.out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                out[name] = x
        return out

    def fold_norms(self) -> None:
        for m in self.modules():
            if isinstance(m, NormConv2d):
                m.fold_norm()
