"""Activation outlier clamping with a sparse residual ("Optimizing LLM training using FP4 quantization").

A few large activations stretch a 4-bit scale so far that most values round to zero. The input is
clamped to its [1 - q, q] quantiles (over the whole tensor) before quantization; the residual
x - clamp(x) is nonzero on about 2 (1 - q) of the entries and is multiplied in high precision
(a sparse GEMM) and added back, so nothing is lost beyond the quantization error of the clamped part.
"""
from __future__ import annotations

import torch


def quantile_bounds(x: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The values at sorted positions floor((1 - q) n) and floor(q n) (0-based), as the authors index them."""
    if not 0.5 < q < 1:
        raise ValueError(f"q: expected a quantile in (0.5, 1), got {q}")
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise ValueError("x: cannot take quantiles of an empty tensor")
    lo = flat.kthvalue(int((1 - q) * n) + 1).values  # kthvalue is 1-based and O(n), no full sort
    hi = flat.kthvalue(min(int(q * n), n - 1) + 1).values
    return lo, hi


def clamp_outliers(x: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamp(x, lo, hi), x - clamp(x, lo, hi)) with lo, hi the [1 - q, q] quantiles of x."""
    lo, hi = quantile_bounds(x, q)
    xc = x.clamp(lo.to(x.dtype), hi.to(x.dtype))
    return xc, x - xc
