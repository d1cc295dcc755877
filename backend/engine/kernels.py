"""fp32 convolutions and linear layers through oneDNN with weights pre-packed once at load.

Why: on CPU, `F.conv2d` already runs oneDNN but re-lays out its weight on every call and runs ReLU and the
residual add as separate passes over the activations; `F.linear` runs MKL's sgemm. oneDNN's fused
primitives (`torch.ops.mkldnn._convolution_pointwise` / `_linear_pointwise`, the ones torch.compile's CPU
backend emits) take a weight packed in oneDNN's blocked layout and apply bias, ReLU and the residual add
in the same pass. Same arithmetic (fp32 accumulate), so the output moves only by summation order.

Packing is an inference-time transform applied after strict loading (like BatchNorm folding); the packed
weight is an extra attribute, the module's parameters and state_dict keys are untouched. Where the ops
are missing (a torch built without oneDNN) or the tensors are not fp32 CPU tensors, the plain functional
call runs instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Typical number of tokens of the pixel decoder (640x864 input): the packed GEMM layout is tuned for it but
# correct for any row count.
LINEAR_ROWS_HINT = 11340


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _plain_fp32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def pack_conv(conv: nn.Conv2d) -> None:
    """Attach `conv._packed` (the weight in oneDNN's layout) for `conv2d_act`."""
    conv._packed = torch.ops.mkldnn._reorder_convolution_weight(
        conv.weight.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, None)


def pack_linear(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "_packed",
                rows_hint: int = LINEAR_ROWS_HINT) -> None:
    """Attach `layer.<name>` = (packed weight, bias) for `linear_act` (weight may be a fused concatenation)."""
    weight = weight.detach().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
    setattr(layer, name, (packed, weight, None if bias is None else bias.detach().contiguous()))


def conv2d_act(conv: nn.Conv2d, x: torch.Tensor, relu: bool = False,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv(x) [+ add]) with act = ReLU or identity, fused when the weight is packed."""
    packed = getattr(conv, "_packed", None)
    if packed is not None and _plain_fp32(x) and (add is None or add.dtype == x.dtype):
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, *args,
                                                           "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, packed, conv.bias, *args, "add", None,
                                                              "relu" if relu else None, [], "")
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if add is not None:
        y += add
    return F.relu_(y) if relu else y


def linear_act(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               relu: bool = False, add: torch.Tensor | None = None, name: str = "_packed") -> torch.Tensor:
    """x @ weight.T + bias, then ReLU or `+ add` (not both); `layer.<name>` set by `pack_linear` for this
    same weight selects oneDNN."""
    packed = getattr(layer, name, None)
    if packed is not None and _plain_fp32(x) and (add is None or (add.dtype == x.dtype and add.is_contiguous())):
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, packed[0], packed[2], "add")
        return torch.ops.mkldnn._linear_pointwise(x, packed[0], packed[2], "relu" if relu else "none", [], "")
    y = F.linear(x, weight, bias)
    if add is not None:
        return add + y      # out of place: under autocast the residual stays in its own (fp32) dtype
    return F.relu_(y) if relu else y
