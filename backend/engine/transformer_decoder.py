"""Masked-attention transformer decoder (Mask2Former), batch-first, with checkpoint-compatible names.

Attention parameters keep nn.MultiheadAttention's layout (`in_proj_weight`, `in_proj_bias`,
`out_proj.*`) so the hub checkpoint loads as is; the computation uses scaled_dot_product_attention
with one boolean mask shared by all heads instead of a per-head copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import NormConv2d
from .config import DecoderConfig
from .pixel_decoder import SinePositionEmbedding


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

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor | None, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            t = self.norm(tgt)
            return tgt + self.multihead_attn(t + query_pos, memory + pos, memory, allowed)
        return self.norm(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory, allowed))


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

    def _heads(self, output: torch.Tensor, mask_features: torch.Tensor,
               attn_size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = self.decoder_norm(output)
        logits = self.class_embed(x)
        emb = self.mask_embed(x)
        n, c, h, w = mask_features.shape
        masks = torch.bmm(emb, mask_features.reshape(n, c, h * w)).view(n, -1, h, w)
        if attn_size is None:
            return logits, masks, None
        small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        # Mask2Former: a query attends where its own predicted mask is foreground (sigmoid >= 0.5);
        # a query whose mask is empty at this scale attends everywhere.
        allowed = small.sigmoid().flatten(2) >= 0.5
        empty = ~allowed.any(-1, keepdim=True)
        allowed = (allowed | empty).unsqueeze(1)
        return logits, masks, allowed

    def forward(self, feats: list[torch.Tensor], mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: 3 maps low->high resolution. Returns (pred_logits (N, Q, C+1), pred_masks (N, Q, H/4, W/4))."""
        if len(feats) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(feats)}")
        src, pos, sizes = [], [], []
        for i, x in enumerate(feats):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            pos.append(self.pe(h, w, x.device).flatten(2).transpose(1, 2))
            s = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.transpose(1, 2))
        n = src[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(n, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(n, -1, -1)
        _, _, allowed = self._heads(output, mask_features, sizes[0])
        logits = masks = None
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](output, src[lvl], allowed, pos[lvl], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            logits, masks, allowed = self._heads(
                output, mask_features, None if last else sizes[(i + 1) % self.num_feature_levels])
        if logits is None:
            logits, masks, _ = self._heads(output, mask_features, None)
        return logits, masks
