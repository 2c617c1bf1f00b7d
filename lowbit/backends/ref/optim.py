"""The elementwise Stable-SPAM step and its per-tensor statistics: the executable spec.

Every native implementation (csrc/cpu/optim.cpp, csrc/cuda/optim.cu) gives the same bits as the
PyTorch code here in fp32; `lowbit.optim.kernels` picks one through the backend registry. To make that possible the arithmetic is defined exactly:

Statistics of a tensor g (n elements, fp32):
  * ``amax = max |g_i|`` (order-free), and whether any g_i is NaN / Inf.
  * ``sumsq = sum_i g_i^2`` in fp64 (each square is exact in fp64) in a fixed order: element i
    goes to lane ``i mod 16`` of row ``i div 16`` (the last row padded with zeros); the rows are
    summed lane by lane with a pairwise tree over adjacent rows ((r0+r1)+(r2+r3))+..., the row
    count padded with zero rows to a power of two; the 16 lane sums are then combined with the
    same adjacent pairwise tree. (Padding with +0 changes no partial sum, so an implementation
    may stream rows through a binary counter and fold what is left, and may split the rows
    into aligned power-of-two chunks for threads.)
  * with AdaClip: the same sum over the clipped values ``c_i = |g_i| > mh ? g_i * r : g_i``, and
    the count of clipped entries.

Elementwise step per tensor, every scalar first rounded to fp32, every operation one IEEE fp32
rounding (no fused multiply-add):
  g  = clip ? (|g| > mh ? g * r : g) : g
  g  = g * f                                           (AdaGN factor)
  m  = m * b1 + g * (1 - b1)                           (m = v = 0 first when zero is set)
  v  = v * b2 + (g * g) * (1 - b2)
  u  = m / (sqrt(v) * inv_sbc2 + eps)                  (inv_sbc2 = 1 / sqrt(1 - beta2^j); sqrt
                                                        correctly rounded, as IEEE 754 requires)
  p  = p * decay - u * step                            (decay = 1 - lr wd, step = lr / bc1)

Moments stored in bf16 / fp8 / int8 (`lowprec_step`): the same step between a decode and an
encode of the moments; its spec is that composition, ``state.load_moments`` (the first moment
zeroed where the second decodes to 0), the step above, zeroing after the update where asked
(compat="official" resets), ``state.store_moment``. The native kernel does it block by block.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LANES = 16
# per-tensor scalars of the elementwise step, in the order the native kernels read them
SCALARS = ("clip", "mh", "r", "f", "b1", "omb1", "b2", "omb2", "inv_sbc2", "eps", "decay", "step", "zero")


def f32(x: float) -> float:
    """x rounded to the nearest fp32 value (returned as a Python float, exactly representable)."""
    return float(np.float32(x))


def _tree_rows(q: torch.Tensor) -> torch.Tensor:
    """Adjacent pairwise tree over dim 0 (padded with zero rows to a power of two)."""
    n = q.shape[0]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        q = torch.cat([q, q.new_zeros((size - n,) + tuple(q.shape[1:]))])
    while q.shape[0] > 1:
        q = q[0::2] + q[1::2]
    return q[0]


def sumsq_spec(x: torch.Tensor) -> float:
    """sum of x_i^2 in fp64 in the order defined above."""
    flat = x.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return 0.0
    pad = (-n) % LANES
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = _tree_rows((flat * flat).view(-1, LANES))
    return _tree_rows(lanes.view(LANES, 1))[0].item()


def grad_stats(grads: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per tensor (max |g|, sum g^2); max |g| is +inf where the tensor holds NaN or Inf."""
    amax, sumsq = [], []
    for g in grads:
        s = sumsq_spec(g)
        a = g.abs().max().item() if g.numel() else 0.0
        amax.append(a if math.isfinite(s) else math.inf)
        sumsq.append(s)
    return amax, sumsq


def clipped(g: torch.Tensor, mh: float, r: float) -> torch.Tensor:
    """``|g| > mh ? g * r : g`` with fp32 mh, r (the comparison and product in g's dtype)."""
    return torch.where(g.abs() > mh, g * r, g)


def clip_stats(grads: list[torch.Tensor], mh: list[float], r: list[float]) -> tuple[list[float], list[int]]:
    """Per tensor (sum of the clipped values squared, number of clipped entries); mh, r fp32."""
    sums, counts = [], []
    for g, a, b in zip(grads, mh, r):
        sums.append(sumsq_spec(clipped(g, a, b)))
        counts.append(int((g.abs() > a).sum()))
    return sums, counts


def adam_step(params, grads, ms, vs, scalars: list[tuple], foreach: bool = True) -> None:
    """One elementwise step per tensor, in place on params, ms, vs (one foreach pass, or tensor by tensor)."""
    if foreach:
        _adam_foreach(params, grads, ms, vs, scalars)
    else:
        for i in range(len(params)):
            _adam_foreach([params[i]], [grads[i]], [ms[i]], [vs[i]], [scalars[i]])


def _col(scalars, name):
    i = SCALARS.index(name)
    return [s[i] for s in scalars]


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """IEEE (correctly rounded) sqrt. torch's vectorised fp32 sqrt is not correctly rounded on
    every CPU (measured: 20 % of results 1 ulp off with AVX-512); the fp64 root of an fp32 value
    rounded to fp32 is (53 >= 2 * 24 + 2 bits)."""
    return torch.sqrt(v.double()).float() if v.dtype == torch.float32 else torch.sqrt(v)


def _adam_foreach(params, grads, ms, vs, scalars) -> None:
    gs = []
    for g, s in zip(grads, scalars):
        if s[0]:
            g = clipped(g, s[1], s[2])
        gs.append(g)
    gs = torch._foreach_mul(gs, _col(scalars, "f"))
    fresh = [t for t, s in zip(ms, scalars) if s[-1]] + [t for t, s in zip(vs, scalars) if s[-1]]
    if fresh:
        torch._foreach_zero_(fresh)
    torch._foreach_mul_(ms, _col(scalars, "b1"))
    torch._foreach_add_(ms, torch._foreach_mul(gs, _col(scalars, "omb1")))
    torch._foreach_mul_(vs, _col(scalars, "b2"))
    sq = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(sq, _col(scalars, "omb2"))
    torch._foreach_add_(vs, sq)
    denom = [_sqrt(v) for v in vs]
    torch._foreach_mul_(denom, _col(scalars, "inv_sbc2"))
    torch._foreach_add_(denom, _col(scalars, "eps"))
    upd = torch._foreach_div(ms, denom)
    torch._foreach_mul_(upd, _col(scalars, "step"))
    torch._foreach_mul_(params, _col(scalars, "decay"))
    torch._foreach_sub_(params, upd)


# The op functions of the registry's "optim" family, with the native kernels' signatures.
def optim_grad_stats(grads: list[torch.Tensor]) -> torch.Tensor:
    """[n, 2] fp64: (max |g|, sum g^2) per tensor."""
    amax, sumsq = grad_stats(grads)
    return torch.tensor(list(zip(amax, sumsq)), dtype=torch.float64).reshape(-1, 2)


def optim_clip_stats(grads: list[torch.Tensor], mh: list[float], r: list[float]) -> torch.Tensor:
    """[n, 2] fp64: (sum of the clipped values squared, number clipped) per tensor."""
    sums, counts = clip_stats(grads, mh, r)
    return torch.tensor(list(zip(sums, counts)), dtype=torch.float64).reshape(-1, 2)


def optim_adam_step(params, grads, ms, vs, scalars: torch.Tensor) -> None:
    adam_step(params, grads, ms, vs, [tuple(row) for row in scalars.tolist()])
