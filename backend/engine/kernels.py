"""Convolution and linear layers with their ReLU / residual add fused or done in place.

`F.conv2d` on CPU already runs oneDNN, then ReLU and the residual add are separate passes over the
activations (and the add a new tensor). oneDNN's fused primitive (`torch.ops.mkldnn._convolution_pointwise`,
the one torch.compile's CPU backend emits) applies bias, the add and ReLU while the output tile is still
in cache. Same arithmetic (fp32 accumulate, then add, then ReLU), so the output is unchanged.

Measured on the 2-core AVX2 machine of docs/benchmarks/engine.md (one thread, CPU time, 640x864 input shapes):
- weights pre-packed in oneDNN's blocked layout (`_reorder_convolution_weight`) are 2-6x SLOWER on
  3x3 convolutions whenever the image size differs from the size given when packing, so they are not used;
  the fused primitive takes the plain channels_last weight;
- for linear layers MKL's sgemm (`F.linear`) beats oneDNN's `_linear_pointwise` by 5-12% on this CPU
  (both take AVX2 paths), so linear layers stay on `F.linear`, with in-place ReLU / residual add.

Where the fused op is missing (a torch without oneDNN) or under autocast / on other devices, the plain
functional calls run instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fused_conv_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_FUSED_CONV = _fused_conv_available()


def _plain_fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def conv2d_act(conv: nn.Conv2d, x: torch.Tensor, relu: bool = False,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv(x) [+ add]) with act = ReLU or identity; one fused oneDNN pass for fp32 CPU tensors."""
    if (_FUSED_CONV and _plain_fp32_cpu(x) and conv.weight.dtype == torch.float32
            and (add is None or (add.dtype == torch.float32 and add.shape[1] == conv.out_channels))):
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *args,
                                                           "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, conv.weight, conv.bias, *args, "add", None,
                                                              "relu" if relu else None, [], "")
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if add is not None:
        y = y + add
    return F.relu_(y) if relu else y


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, then ReLU or `+ add` in place on the fresh output (no extra tensor)."""
    y = F.linear(x, weight, bias)
    if add is not None:
        # Under autocast y is bfloat16: add out of place so the residual stream keeps its own dtype.
        return y.add_(add) if y.dtype == add.dtype else add + y
    return F.relu_(y) if relu else y
