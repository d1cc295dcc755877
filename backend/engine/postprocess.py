"""M2FP's instance-parsing inference + the pipeline's output step, upsampling only what can be kept.

The reference upsamples all Q query masks to the padded input size, crops the resized image, resizes
to the original size, then takes the top-k (query, class) pairs, scoring each as
class_prob * mean(sigmoid(logit) over pixels where logit > 0). Parts (not Background, not Human) are kept
when score >= part_score_thr, humans when score > human_score_thr; masks are logit > 0.

Since the mask factor is below 1, score <= class_prob: a pair whose class probability is under the
threshold can never be kept, so only the remaining pairs' queries are upsampled, one query at a time,
with the same two bilinear steps (align_corners=False). Peak memory is a few full-size planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .types import Instance, Parsing


@dataclass(frozen=True)
class Candidate:
    query: int
    class_id: int
    class_prob: float


def select_candidates(logits: torch.Tensor, config: ModelConfig) -> list[Candidate]:
    """logits (Q, C+1) -> the top-k (query, class) pairs that could pass a threshold, in top-k order."""
    probs = F.softmax(logits.float(), dim=-1)[:, :-1]
    q, c = probs.shape
    k = min(config.test_topk_per_image, q * c)
    top_probs, top_idx = probs.flatten().topk(k, sorted=False)
    floor = min(config.part_score_thr, config.human_score_thr)
    out = []
    for p, i in zip(top_probs.tolist(), top_idx.tolist()):
        label = i % c
        if label == 0 or p < floor:
            continue
        out.append(Candidate(query=i // c, class_id=label, class_prob=p))
    return out


_CHUNK_PIXELS = 16_000_000


def upsample_logits(mask_logits: torch.Tensor, padded: tuple[int, int], resized: tuple[int, int],
                    original: tuple[int, int]) -> torch.Tensor:
    """(n, h4, w4) low-res logits -> (n, H, W) at the original size, as the reference computes them."""
    x = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)
    x = x[:, :, :resized[0], :resized[1]]
    return F.interpolate(x, size=original, mode="bilinear", align_corners=False)[0]


def _masks_and_scores(mask_logits: torch.Tensor, queries: list[int], padded: tuple[int, int],
                      resized: tuple[int, int], original: tuple[int, int],
                      chunk: int = 4) -> dict[int, tuple[np.ndarray, float]]:
    """query -> (mask = logit > 0 at the original size, mean sigmoid over that mask), a few queries at a time."""
    out: dict[int, tuple[np.ndarray, float]] = {}
    # A chunk's float logits at the original size take 4 bytes per pixel per query (400 MB for 4 queries at
    # 25 MP): large images go one query at a time. Same results, bounded peak memory.
    chunk = max(1, min(chunk, _CHUNK_PIXELS // max(1, original[0] * original[1])))
    for i in range(0, len(queries), chunk):
        qs = queries[i:i + chunk]
        up = upsample_logits(mask_logits[qs], padded, resized, original)
        fg = up > 0
        counts = fg.flatten(1).sum(1).float()
        sums = up.sigmoid_().mul_(fg).flatten(1).sum(1)
        scores = (sums / (counts + 1e-6)).tolist()
        masks = fg.cpu().numpy()
        for j, q in enumerate(qs):
            out[q] = (masks[j], scores[j])
        del up, fg
    return out


def assign_persons(parts: list[Instance], humans: list[Instance]) -> list[Instance]:
    """Each part's `person` = the human whose mask overlaps it most (None when none overlaps)."""
    if not humans:
        return parts
    out = []
    for part in parts:
        rows = np.flatnonzero(part.mask.any(axis=1))
        if rows.size == 0:
            out.append(part)
            continue
        cols = np.flatnonzero(part.mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        window = part.mask[y0:y1, x0:x1]
        overlaps = [int(np.count_nonzero(h.mask[y0:y1, x0:x1] & window)) for h in humans]
        best = int(np.argmax(overlaps))
        person = best if overlaps[best] > 0 else None
        out.append(Instance(part.label, part.class_id, part.score, part.mask, person))
    return out


def _order(instances: list[Instance]) -> list[Instance]:
    return sorted(instances, key=lambda inst: (-inst.score, inst.class_id))


@torch.inference_mode()
def parse_outputs(logits: torch.Tensor, mask_logits: torch.Tensor, config: ModelConfig, *,
                  padded: tuple[int, int], resized: tuple[int, int], original: tuple[int, int]) -> Parsing:
    """One image's network outputs (logits (Q, C+1), mask_logits (Q, h4, w4)) -> Parsing at the original size."""
    height, width = original
    candidates = select_candidates(logits, config)
    parts: list[Instance] = []
    humans: list[Instance] = []
    cache = _masks_and_scores(mask_logits, sorted({c.query for c in candidates}), padded, resized, original)
    for cand in candidates:
        mask, mask_score = cache[cand.query]
        score = float(np.float32(cand.class_prob) * np.float32(mask_score))
        label = config.classes[cand.class_id]
        if cand.class_id == config.human_class_id:
            if score > config.human_score_thr:
                humans.append(Instance(label, cand.class_id, score, mask))
        elif score >= config.part_score_thr and score > 0.0:
            parts.append(Instance(label, cand.class_id, score, mask))
    humans = _order(humans)
    parts = assign_persons(_order(parts), humans)
    return Parsing(width=width, height=height, parts=parts, humans=humans)
