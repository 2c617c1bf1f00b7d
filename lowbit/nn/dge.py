"""Differentiable gradient estimator (DGE) for FP4 weights ("Optimizing LLM training using FP4 quantization").

Instead of the straight-through estimator (derivative 1), the weight gradient is multiplied by the
derivative of a smooth approximation of the quantization step. Inside a quantization interval
[left, left + d] of the E2M1 grid, with t = v - left the scaled weight's offset,
    f(t)  = d/2 * (1 + sign(2t/d - 1) * |2t/d - 1|^(1/k))
    f'(t) = |2t/d - 1|^(1/k - 1) / k,   clipped at `clip`
which is 1/k at the grid points, grows towards the interval's midpoint (where rounding flips) and
averages to 1 over an unclipped interval. Beyond the last interval (|v| > 6, saturated) the [4, 6]
interval's formula continues, as in the authors' kernel. The scale cancels: d Q(w s)/s / dw = f'(w s).
"""
from __future__ import annotations

import torch

from ..qtensor import QTensor

E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dge_derivative_of_scaled(v: torch.Tensor, k: float = 5.0, clip: float = 3.0) -> torch.Tensor:
    """f'(v) for values `v` already in the E2M1 element domain (fp32)."""
    a = v.float().abs()
    levels = torch.tensor(E2M1_LEVELS, dtype=torch.float32, device=v.device)
    i = (torch.bucketize(a, levels, right=True) - 1).clamp(0, len(E2M1_LEVELS) - 2)
    left, width = levels[i], levels[i + 1] - levels[i]
    u = (2 * (a - left) / width - 1).abs()
    return (u.pow(1.0 / k - 1.0) / k).clamp(max=clip)


def _expand(s: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    """Per-block scales [R/br, K/bk] -> one per element [R, K]."""
    return s.repeat_interleave(br, 0).repeat_interleave(bk, 1)


def element_domain(weight: torch.Tensor, q: QTensor) -> torch.Tensor:
    """`weight` divided by its per-element quantization scale: the value the E2M1 grid rounds."""
    if len(q.shape) != 2 or q.axis != 1 or tuple(q.shape) != tuple(weight.shape):
        raise ValueError(f"q: expected the quantized weight [out, in] along in_features, got {q!r}")
    br, bk = q.block
    if q.fmt.kind == "nvfp4":
        s_blk = _expand(q.scale.float(), br, bk)
        return weight.float() * q.global_scale / s_blk
    if q.fmt.kind == "mx":
        return weight.float() * torch.exp2(127.0 - _expand(q.scale.to(torch.float32), br, bk))
    raise ValueError(f"q: DGE needs an FP4 weight (mxfp4 or nvfp4), got {q.fmt.name}")


def dge_derivative(weight: torch.Tensor, q: QTensor, k: float = 5.0, clip: float = 3.0) -> torch.Tensor:
    """Elementwise factor that turns the gradient w.r.t. Q(W) into the DGE gradient w.r.t. W."""
    return dge_derivative_of_scaled(element_domain(weight, q), k, clip)
