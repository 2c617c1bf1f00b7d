"""Turning block scores [B, H, n, n] into a causal block mask, and measuring its density.

Every mask keeps the diagonal block and nothing above it. Density is the fraction of the causal
blocks (n (n + 1) / 2 per head) that are selected, the quantity a block-sparse kernel's work scales
with. Three rules:
  threshold  keep blocks whose score exceeds T (scores are the gate's row-normalised softmax)
  top-k      keep the k best blocks of each query block (all of them when fewer exist)
  density    keep round(D * (i + 1)) blocks (at least 1) of query block i, so every row, and the
             whole map, sits at density D; the rule used to compare gates at equal density
Two reference patterns for those comparisons: `static_scores` (attention sink + sliding window)
and the oracle, which is the true pooled attention map from `attention_with_block_pool`.
"""
from __future__ import annotations

import math

import torch


def _check_scores(scores) -> int:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores: expected a floating-point torch.Tensor [batch, heads, n, n]")
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores: expected shape [batch, heads, n, n], got {tuple(scores.shape)}")
    return scores.shape[-1]


def _causal(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def by_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    n = _check_scores(scores)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"threshold: expected a float in [0, 1), got {threshold!r}")
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    return ((scores > threshold) | eye) & _causal(n, scores.device)


def _top_per_row(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep keep[i] best causal blocks of row i (diagonal first)."""
    n = scores.shape[-1]
    causal = _causal(n, scores.device)
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    ranked = scores.float().masked_fill(~causal, float("-inf")).masked_fill(eye, float("inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return (rank < keep[:, None]) & causal


def by_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    n = _check_scores(scores)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    keep = torch.clamp(torch.arange(1, n + 1, device=scores.device), max=k)
    return _top_per_row(scores, keep)


def blocks_for_density(n: int, density: float, device=None) -> torch.Tensor:
    """Blocks kept in each row: round(density * (i + 1)), at least 1 (the diagonal)."""
    rows = torch.arange(1, n + 1, device=device, dtype=torch.float64)
    return torch.clamp(torch.floor(density * rows + 0.5), min=1).to(torch.int64)


def by_density(scores: torch.Tensor, density: float) -> torch.Tensor:
    n = _check_scores(scores)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density: expected a float in (0, 1], got {density!r}")
    return _top_per_row(scores, blocks_for_density(n, density, scores.device))


def select(scores: torch.Tensor, *, threshold: float | None = None, density: float | None = None,
           topk: int | None = None) -> torch.Tensor:
    """Exactly one rule: threshold=T, density=D or topk=k."""
    given = [name for name, v in (("threshold", threshold), ("density", density), ("topk", topk)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"select: give exactly one of threshold, density, topk; got {given or 'none'}")
    if threshold is not None:
        return by_threshold(scores, threshold)
    if density is not None:
        return by_density(scores, density)
    return by_topk(scores, topk)


def density(mask: torch.Tensor) -> float:
    """Selected fraction of the causal blocks of a [.., n, n] bool mask."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        raise TypeError("mask: expected a bool tensor [..., n, n]")
    n = mask.shape[-1]
    causal_blocks = n * (n + 1) // 2 * math.prod(mask.shape[:-2])
    return float((mask & _causal(n, mask.device)).sum()) / causal_blocks


def static_scores(batch: int, heads: int, n: int, sinks: int = 1, device=None) -> torch.Tensor:
    """Scores that rank the first `sinks` blocks first, then blocks by recency (a sliding window)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    s = 1.0 - (i - j).clamp(min=0).float() / (2 * n)  # recency in (0.5, 1]
    s = torch.where(j < sinks, torch.full_like(s, 2.0), s)
    return s.masked_fill(j > i, 0.0).expand(batch, heads, n, n)
