"""Masked-attention transformer decoder (Mask2Former), batch-first, with checkpoint-compatible names.

Attention parameters keep nn.MultiheadAttention's layout (`in_proj_weight`, `in_proj_bias`,
`out_proj.*`) so the hub checkpoint loads as is; the computation uses scaled_dot_product_attention
with one boolean mask shared by all heads instead of a per-head copy.

Masked attention needs each layer's predicted masks only at the next layer's (small) feature size.
Mask logits are a per-pixel linear map of the mask features and bilinear resizing is linear too, so
resizing the 256 mask-feature channels once per feature size and applying the map there gives the same
attention masks (up to float summation order) without the 9 full-resolution (Q, H/4 x W/4) products
only the last of which is an output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import NormConv2d
from .config import DecoderConfig
from .pixel_decoder import SinePositionEmbedding, to_tokens


class _OutProj(nn.Linear):
    pass


class Attention(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = _OutProj(d_model, d_model)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, Lq, E), key/value (N, Lk, E); allowed: bool (N, 1, Lq, Lk), True = may attend."""
        n, lq, e = query.shape
        lk = key.shape[1]
        h = self.nhead
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(n, lq, h, e // h).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(n, lk, h, e // h).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(n, lk, h, e // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, e))



class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            t = self.norm(tgt)
            q = t + query_pos
            return tgt + self.self_attn(q, q, t)
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, tgt))


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__()
        self.multihead_attn = Attention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor | None,
                memory_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """memory_pos = memory + its position embedding (the keys' input)."""
        if self.pre_norm:
            t = self.norm(tgt)
            return tgt + self.multihead_attn(t + query_pos, memory_pos, memory, allowed)
        return self.norm(tgt + self.multihead_attn(tgt + query_pos, memory_pos, memory, allowed))


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class MaskedTransformerDecoder(nn.Module):
    num_feature_levels = 3

    def __init__(self, in_channels: int, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_heads = cfg.nheads
        self.num_layers = cfg.dec_layers
        self.num_classes = cfg.num_classes
        self.num_queries = cfg.num_queries
        self.pe = SinePositionEmbedding(d // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.nheads, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.nheads, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, cfg.dim_feedforward, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(self.num_feature_levels, d)
        self.input_proj = nn.ModuleList(
            NormConv2d(in_channels, d, kernel_size=1) if (in_channels != d or cfg.enforce_input_project)
            else nn.Sequential()
            for _ in range(self.num_feature_levels))
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def _heads(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.decoder_norm(output)
        return self.class_embed(x), self.mask_embed(x)

    @staticmethod
    def _mask_logits(emb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """emb (N, Q, C) x features (N, C, H, W) -> (N, Q, H, W), without copying channels_last features."""
        n, c, h, w = features.shape
        if features.is_contiguous():
            flat = features.reshape(n, c, h * w)
        else:
            flat = to_tokens(features).transpose(1, 2)
        return torch.bmm(emb, flat).view(n, -1, h, w)

    @classmethod
    def _allowed(cls, emb: torch.Tensor, small_features: torch.Tensor) -> torch.Tensor:
        # Mask2Former: a query attends where its own predicted mask is foreground (sigmoid >= 0.5);
        # a query whose mask is empty at this scale attends everywhere.
        small = cls._mask_logits(emb, small_features)
        allowed = small.sigmoid().flatten(2) >= 0.5
        empty = ~allowed.any(-1, keepdim=True)
        return (allowed | empty).unsqueeze(1)

    def forward(self, feats: list[torch.Tensor], mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: 3 maps low->high resolution. Returns (pred_logits (N, Q, C+1), pred_masks (N, Q, H/4, W/4))."""
        if len(feats) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(feats)}")
        src, memory_pos, sizes = [], [], []
        for i, x in enumerate(feats):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            s = to_tokens(self.input_proj[i](x)) + self.level_embed.weight[i].view(1, 1, -1)
            src.append(s)
            # keys of the cross-attention at this level: the same for every layer that reads it
            memory_pos.append(s + self.pe.tokens(h, w, x.device))
        small_features = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                          for size in sizes]
        n = src[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(n, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(n, -1, -1)
        _, emb = self._heads(output)
        allowed = self._allowed(emb, small_features[0])
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](output, src[lvl], allowed, memory_pos[lvl],
                                                                query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            if i < self.num_layers - 1:
                _, emb = self._heads(output)
                allowed = self._allowed(emb, small_features[(i + 1) % self.num_feature_levels])
        logits, emb = self._heads(output)
        return logits, self._mask_logits(emb, mask_features)
