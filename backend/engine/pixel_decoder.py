"""Multi-scale deformable-attention pixel decoder (Mask2Former's MSDeformAttnPixelDecoder), pure PyTorch.

Deformable attention has `F.grid_sample` semantics (bilinear, zero padding, align_corners=False), which is
what modelscope itself runs on CPU (mmcv's kernel raises there), computed as one weighted embedding-bag
sum per (query, head) over a value table whose maps carry a zero border (see `sample_and_weight`).

Layout: tokens are (N, H*W, C), which is exactly the memory of a channels_last (N, C, H, W) map, so the
conversions between maps (convolutions, GroupNorm, resizes) and tokens (attention, LayerNorm, linear
layers) are views, not copies, when the backbone runs channels_last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import NormConv2d
from .config import EncoderConfig
from .kernels import conv2d_act, linear_act

_POS_CACHE_SIZE = 16


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C): a view of a channels_last map, a copy otherwise."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H*W, C) tokens (rows contiguous) -> (N, C, H, W) channels_last view."""
    n, _, c = tokens.shape
    return tokens.view(n, h, w, c).permute(0, 3, 1, 2)


class SinePositionEmbedding:
    """DETR's normalised sine embedding of a (H, W) grid with no padding mask; depends only on the shape."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def __call__(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, 2*num_pos_feats, h, w), float32 (channels_last)."""
        return to_map(self.tokens(h, w, device), h, w)

    def tokens(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, h*w, 2*num_pos_feats), float32, contiguous."""
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
        pos = torch.cat((pos_y, pos_x), dim=3).reshape(1, h * w, -1).contiguous()
        if len(self._cache) >= _POS_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = pos
        return pos


@dataclass(frozen=True)
class SamplingGrid:
    """Per-shape constants of deformable sampling (built once per input size, see `sampling_grid`).

    Each level's value map is stored with a zero border (1 row/column before, 2 after) in a padded value
    table of `padded_rows` rows per image, `heads` table rows per position. Clamping a sample position to
    [-1, size] then puts every corner outside the map on a zero row with the right bilinear weight, which
    is grid_sample's zero padding without any validity mask.
    """
    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]           # first token of each level
    padded_starts: tuple[int, ...]    # first padded row of each level
    padded_rows: int
    ref_x: torch.Tensor               # (1, S, 1, L, 1): pixel x of each query's reference point per level
    ref_y: torch.Tensor
    hi_x: torch.Tensor                # (1, 1, 1, L, 1): W, H of each level (the clamp's upper bound)
    hi_y: torch.Tensor
    row_stride: torch.Tensor          # (1, 1, 1, L, 1): table rows per padded map row = (W + 3) * heads
    base: torch.Tensor                # (N, 1, heads, L, 1): table row of pixel (0, 0) of each level
    corners: torch.Tensor             # (L, 1, 4) int: row offsets of the 4 bilinear corners
    index_dtype: torch.dtype


def sampling_grid(shapes: list[tuple[int, int]], n: int, heads: int, device: torch.device) -> SamplingGrid:
    levels = len(shapes)
    starts, padded_starts, s, sp = [], [], 0, 0
    for h, w in shapes:
        starts.append(s)
        padded_starts.append(sp)
        s += h * w
        sp += (h + 3) * (w + 3)
    rows = n * sp * heads
    # Row indices are computed in floating point: exact below 2**24 (float32) / 2**53 (float64).
    fdt = torch.float32 if rows < 2 ** 24 else torch.float64
    ref = DeformTransformerEncoder.reference_points(shapes, device)[:, :, 0]      # (1, S, 2), same per level
    size_w = torch.tensor([w for _, w in shapes], dtype=fdt, device=device).view(1, 1, 1, levels, 1)
    size_h = torch.tensor([h for h, _ in shapes], dtype=fdt, device=device).view(1, 1, 1, levels, 1)
    # grid_sample, align_corners=False: pixel = loc * size - 0.5
    ref_x = ref[:, :, 0].to(fdt).view(1, s, 1, 1, 1) * size_w - 0.5
    ref_y = ref[:, :, 1].to(fdt).view(1, s, 1, 1, 1) * size_h - 0.5
    stride = (size_w + 3) * heads
    first = torch.tensor(padded_starts, dtype=fdt, device=device).view(1, 1, 1, levels, 1) * heads + stride + heads
    base = (first + torch.arange(n, dtype=fdt, device=device).view(n, 1, 1, 1, 1) * (sp * heads)
            + torch.arange(heads, dtype=fdt, device=device).view(1, 1, heads, 1, 1))
    index_dtype = torch.int32 if rows < 2 ** 31 else torch.int64
    corners = torch.tensor([[0, heads, (w + 3) * heads, (w + 3) * heads + heads] for _, w in shapes],
                           dtype=index_dtype, device=device).view(levels, 1, 4)
    return SamplingGrid(tuple(shapes), tuple(starts), tuple(padded_starts), sp, ref_x.contiguous(),
                        ref_y.contiguous(), size_w, size_h, stride, base, corners, index_dtype)


def padded_value_table(value: torch.Tensor, grid: SamplingGrid, out: torch.Tensor | None = None) -> torch.Tensor:
    """value (N, S, C) -> (N, padded_rows, C) with each level's map inside a zero border."""
    n, _, c = value.shape
    if out is None:
        out = value.new_zeros(n, grid.padded_rows, c)
    for (h, w), start, pstart in zip(grid.shapes, grid.starts, grid.padded_starts):
        dst = out[:, pstart:pstart + (h + 3) * (w + 3)].view(n, h + 3, w + 3, c)[:, 1:h + 1, 1:w + 1]
        dst.copy_(value[:, start:start + h * w].view(n, h, w, c))
    return out


def sample_and_weight(table: torch.Tensor, grid: SamplingGrid, offsets: torch.Tensor, weights: torch.Tensor,
                      heads: int) -> torch.Tensor:
    """Multi-scale deformable attention core: bilinear samples (zero outside, align_corners=False, i.e.
    `F.grid_sample` semantics) of every head's value map, weighted by the attention weights and summed.

    table (N, padded_rows, heads*dh) from `padded_value_table`; offsets (N, Lq, heads, L, P, 2) in pixels
    of each level as (x, y) (the official `offsets / normalizer` times the level size); weights
    (N, Lq, heads, L, P). Returns (N, Lq, heads*dh).

    Each (batch, query, head) is one bag of L*P*4 (row, weight) pairs over the (N*padded_rows*heads, dh)
    table, summed by `F.embedding_bag`: same sum as grid_sample-then-weight, without materialising samples.
    """
    n, rows, c = table.shape
    dh = c // heads
    lq = offsets.shape[1]
    fdt = grid.ref_x.dtype
    x = torch.add(grid.ref_x, offsets[..., 0].to(fdt)).clamp_(min=-1.0)
    y = torch.add(grid.ref_y, offsets[..., 1].to(fdt)).clamp_(min=-1.0)
    x = torch.minimum(x, grid.hi_x, out=x)
    y = torch.minimum(y, grid.hi_y, out=y)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x.sub_(x0), y.sub_(y0)
    first = torch.addcmul(grid.base, y0, grid.row_stride).add_(x0, alpha=heads)
    idx = (first.to(grid.index_dtype).unsqueeze(-1) + grid.corners).view(n * lq * heads, -1)
    w = weights.to(fdt)
    wy1 = fy.mul_(w)
    wy = torch.stack((w - wy1, wy1), -1)                     # (..., 2): rows y0, y0 + 1
    wx = torch.stack((1 - fx, fx), -1)                        # (..., 2): columns x0, x0 + 1
    wts = (wy.unsqueeze(-1) * wx.unsqueeze(-2)).to(table.dtype).view(n * lq * heads, -1)
    out = F.embedding_bag(idx, table.reshape(n * rows * heads, dh), per_sample_weights=wts, mode="sum")
    return out.view(n, lq, c)


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

    def _query_proj(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Offsets and attention logits come from the same query: one GEMM with the two weights stacked."""
        return (torch.cat((self.sampling_offsets.weight, self.attention_weights.weight)),
                torch.cat((self.sampling_offsets.bias, self.attention_weights.bias)))

    def forward(self, query: torch.Tensor, value_in: torch.Tensor, grid: SamplingGrid,
                residual: torch.Tensor | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, Lq, C); value_in (N, sum HW, C); returns output_proj(attention) (+ residual)."""
        n, lq, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in)
        table = padded_value_table(value, grid, table)
        proj = F.linear(query, *self._query_proj())
        n_off = heads * levels * points * 2
        offsets = proj[..., :n_off].view(n, lq, heads, levels, points, 2)
        weights = F.softmax(proj[..., n_off:].reshape(n, lq, heads, levels * points).float(), -1)
        out = sample_and_weight(table.float(), grid, offsets, weights.view(n, lq, heads, levels, points), heads)
        out = out.to(value.dtype)
        return linear_act(out, self.output_proj.weight, self.output_proj.bias, add=residual)


class DeformEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, grid: SamplingGrid,
                table: torch.Tensor | None = None) -> torch.Tensor:
        src = self.norm1(self.self_attn(src + pos, src, grid, residual=src, table=table))
        hidden = linear_act(src, self.linear1.weight, self.linear1.bias, relu=True)
        return self.norm2(linear_act(hidden, self.linear2.weight, self.linear2.bias, add=src))


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

    def pos_tokens(self, pe: SinePositionEmbedding, shapes: list[tuple[int, int]],
                   device: torch.device) -> torch.Tensor:
        """(1, S, C): every level's sine embedding + its level embedding, cached per input shape."""
        key = (tuple(shapes), str(device), self.level_embed._version, self.level_embed.data_ptr())
        cache = self.__dict__.setdefault("_pos_cache", {})
        if key not in cache:
            if len(cache) >= _POS_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = torch.cat([pe.tokens(h, w, device) + self.level_embed[i].view(1, 1, -1)
                                    for i, (h, w) in enumerate(shapes)], 1)
        return cache[key]

    def grid(self, shapes: list[tuple[int, int]], n: int, device: torch.device) -> SamplingGrid:
        key = (tuple(shapes), n, str(device))
        cache = self.__dict__.setdefault("_grid_cache", {})
        if key not in cache:
            if len(cache) >= _POS_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            heads = self.encoder.layers[0].self_attn.n_heads
            cache[key] = sampling_grid(list(shapes), n, heads, device)
        return cache[key]

    def forward(self, srcs: list[torch.Tensor], pe: SinePositionEmbedding) -> tuple[torch.Tensor, list]:
        """srcs: maps low -> high resolution. Returns tokens (N, S, C) and the level shapes."""
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        out = torch.cat([to_tokens(s) for s in srcs], 1)
        n = out.shape[0]
        pos = self.pos_tokens(pe, shapes, out.device)
        grid = self.grid(shapes, n, out.device)
        # One zero-bordered value table reused by every layer: only the map interiors are rewritten.
        table = out.new_zeros(n, grid.padded_rows, out.shape[2])
        for layer in self.encoder.layers:
            out = layer(out, pos, grid, table)
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
        """Returns (mask_features, the first 3 multi-scale maps from low to high resolution).

        Maps come back channels_last when the features are (views of the encoder's tokens)."""
        srcs = []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            conv, norm = self.input_proj[idx]
            srcs.append(norm(conv2d_act(conv, features[name].float())))
        y, shapes = self.transformer(srcs, self.pe)
        outs = []
        start = 0
        for h, w in shapes:
            outs.append(to_map(y[:, start:start + h * w], h, w))
            start += h * w
        for idx, name in enumerate(self.fpn_features[::-1]):
            # modules were registered high-res first; walk them low-res first
            k = self.num_fpn_levels - idx
            x = features[name].float()
            up = F.interpolate(outs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            lateral = getattr(self, f"adapter_{k}")(x, add=up)
            outs.append(getattr(self, f"layer_{k}")(lateral))
        return self.mask_features(outs[-1]), outs[:self.maskformer_num_feature_levels]
