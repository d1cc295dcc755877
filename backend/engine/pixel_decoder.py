"""Multi-scale deformable-attention pixel decoder (Mask2Former's MSDeformAttnPixelDecoder), pure PyTorch.

Deformable attention has `F.grid_sample` semantics (bilinear, zero padding, align_corners=False), which is
what modelscope itself runs on CPU (mmcv's kernel raises there), computed as one weighted embedding-bag
sum per (query, head): the (heads, dims, queries, levels*points) sample stack is never built, and the
gathers read contiguous value rows instead of strided channel planes (about 2x faster than grid_sample).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import NormConv2d
from .config import EncoderConfig

_POS_CACHE_SIZE = 16


class SinePositionEmbedding:
    """DETR's normalised sine embedding of a (H, W) grid with no padding mask; depends only on the shape."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def __call__(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, 2*num_pos_feats, h, w), float32."""
        key = (h, w, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ones = torch.ones((1, h, w), dtype=torch.float32, device=device)
        y_embed = ones.cumsum(1, dtype=torch.float32)
        x_embed = ones.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).contiguous()
        if len(self._cache) >= _POS_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = pos
        return pos


def sample_and_weight(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                      weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-scale deformable attention core: bilinear samples (zero outside, align_corners=False, i.e.
    `F.grid_sample` semantics) of every head's value map, weighted by the attention weights and summed.

    value (N, S, heads*dh) with S = sum H*W; locations (N, Lq, heads, L, P, 2) as (x, y) in [0, 1];
    weights (N, Lq, heads, L, P). Returns (N, Lq, heads*dh).

    Each (batch, query, head) is one bag of L*P*4 (row, weight) pairs over a (N*heads*S, dh) value table,
    summed by `F.embedding_bag`: the 4 bilinear corners carry (attention weight x corner weight), corners
    outside the map carry 0. Same sum as grid_sample-then-weight, without materialising the samples.
    """
    n, s, c = value.shape
    dh = c // heads
    _, lq, _, levels, points, _ = locations.shape
    # Row indices are computed in floating point (exact below 2**24 rows in float32).
    fdt = torch.float32 if n * heads * s < 2 ** 24 else torch.float64
    dev = value.device
    size_w = torch.tensor([w for _, w in shapes], dtype=fdt, device=dev).view(1, 1, 1, levels, 1)
    size_h = torch.tensor([h for h, _ in shapes], dtype=fdt, device=dev).view(1, 1, 1, levels, 1)
    starts = torch.tensor([sum(h * w for h, w in shapes[:i]) for i in range(levels)], dtype=fdt,
                          device=dev).view(1, 1, 1, levels, 1)
    table_base = (torch.arange(n * heads, dtype=fdt, device=dev) * s).view(n, 1, heads, 1, 1)
    loc = locations.to(fdt)
    # Pixel coordinates, align_corners=False (grid_sample's ((2*loc - 1) + 1) * size / 2 - 0.5, simplified).
    x = loc[..., 0] * size_w - 0.5
    y = loc[..., 1] * size_h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    wx0 = (1 - fx) * ((x0 >= 0) & (x0 <= size_w - 1))
    wx1 = fx * ((x0 >= -1) & (x0 <= size_w - 2))
    wy0 = (1 - fy) * ((y0 >= 0) & (y0 <= size_h - 1)) * weights
    wy1 = fy * ((y0 >= -1) & (y0 <= size_h - 2)) * weights
    cx0 = x0.clamp(0).minimum(size_w - 1)
    cx1 = (x0 + 1).clamp(0).minimum(size_w - 1)
    base = starts + table_base
    r0 = y0.clamp(0).minimum(size_h - 1) * size_w + base
    r1 = (y0 + 1).clamp(0).minimum(size_h - 1) * size_w + base
    bags = n * lq * heads
    idx = torch.stack((r0 + cx0, r0 + cx1, r1 + cx0, r1 + cx1), -1).to(torch.int64).view(bags, -1)
    wts = torch.stack((wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), -1).to(value.dtype).view(bags, -1)
    table = value.view(n, s, heads, dh).permute(0, 2, 1, 3).reshape(n * heads * s, dh)
    out = F.embedding_bag(idx, table, per_sample_weights=wts, mode="sum")
    return out.view(n, lq, heads * dh)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (N, Lq, C); reference_points (N, Lq, L, 2) in [0, 1] as (x, y); value_in (N, sum HW, C)."""
        n, lq, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        weights = F.softmax(self.attention_weights(query).view(n, lq, heads, levels * points), -1)
        weights = weights.view(n, lq, heads, levels, points)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets.float() / normalizer[None, None, None, :, None, :])
        out = sample_and_weight(value.float(), shapes, locations, weights.float(), heads)
        return self.output_proj(out.to(value.dtype))


class DeformEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformEncoderStack(nn.Module):
    def __init__(self, layer_args: tuple, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformEncoderLayer(*layer_args) for _ in range(num_layers))


class DeformTransformerEncoder(nn.Module):
    """Holds `level_embed` and `encoder.layers.*` exactly where the checkpoint has them."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, d_ffn: int, n_levels: int,
                 n_points: int) -> None:
        super().__init__()
        self.encoder = DeformEncoderStack((d_model, d_ffn, n_levels, nhead, n_points), num_layers)
        self.level_embed = nn.Parameter(torch.zeros(n_levels, d_model))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        refs = []
        for h, w in shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None].expand(-1, -1, len(shapes), -1)

    def forward(self, srcs: list[torch.Tensor], pos: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos)], 1)
        ref = self.reference_points(shapes, src_flat.device)
        out = src_flat
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, ref, shapes)
        return out, shapes


class PixelDecoder(nn.Module):
    def __init__(self, input_shape: dict[str, dict[str, int]], cfg: EncoderConfig) -> None:
        super().__init__()
        conv_dim = cfg.conv_dim
        self.conv_dim = conv_dim
        ordered = sorted(((k, v) for k, v in input_shape.items() if k in cfg.in_features),
                         key=lambda kv: kv[1]["stride"])
        self.in_features = [k for k, _ in ordered]
        channels = [v["channels"] for _, v in ordered]
        t_ordered = [(k, v) for k, v in ordered if k in cfg.transformer_in_features]
        if not t_ordered:
            raise ValueError("encoder.transformer_in_features selects no backbone feature")
        self.transformer_in_features = [k for k, _ in t_ordered]
        t_channels = [v["channels"] for _, v in t_ordered]
        t_strides = [v["stride"] for _, v in t_ordered]
        self.num_levels = len(self.transformer_in_features)
        # Projections run from low to high resolution (res5 first).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in t_channels[::-1])
        self.transformer = DeformTransformerEncoder(conv_dim, cfg.transformer_nheads, cfg.transformer_enc_layers,
                                                    cfg.transformer_dim_feedforward, self.num_levels, cfg.n_points)
        self.pe = SinePositionEmbedding(conv_dim // 2)
        self.mask_features = NormConv2d(conv_dim, cfg.mask_dim, kernel_size=1)
        self.maskformer_num_feature_levels = 3
        self.num_fpn_levels = int(np.log2(min(t_strides)) - np.log2(cfg.common_stride))
        self.fpn_features = self.in_features[:self.num_fpn_levels]
        for idx, c in enumerate(channels[:self.num_fpn_levels]):
            self.add_module(f"adapter_{idx + 1}", NormConv2d(c, conv_dim, kernel_size=1, bias=False,
                                                             norm=nn.GroupNorm(32, conv_dim)))
            self.add_module(f"layer_{idx + 1}", NormConv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False,
                                                           norm=nn.GroupNorm(32, conv_dim), relu=True))

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (mask_features, the first 3 multi-scale maps from low to high resolution)."""
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe(x.shape[2], x.shape[3], x.device))
        y, shapes = self.transformer(srcs, pos)
        n = y.shape[0]
        outs = []
        start = 0
        for h, w in shapes:
            outs.append(y[:, start:start + h * w].transpose(1, 2).reshape(n, -1, h, w))
            start += h * w
        for idx, name in enumerate(self.fpn_features[::-1]):
            # modules were registered high-res first; walk them low-res first
            k = self.num_fpn_levels - idx
            lateral = getattr(self, f"adapter_{k}")(features[name].float())
            z = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(getattr(self, f"layer_{k}")(z))
        return self.mask_features(outs[-1]), outs[:self.maskformer_num_feature_levels]
