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
  Both come back as [n, 2] fp64 tensors on the gradients' device, and every per-tensor scalar of
  the step is read from a tensor on that device: nothing is read back to the host, so a training
  step on a GPU never waits for it.

Elementwise step per tensor, every scalar first rounded to fp32, every operation one IEEE fp32
rounding (no fused multiply-add):
  g  = clip ? (|g| > mh ? g * r : g) : g
  g  = g * f                                           (AdaGN factor)
  m  = m * b1 + g * (1 - b1)                           (m = v = 0 first when zero is set)
  v  = v * b2 + (g * g) * (1 - b2)
  u  = m / (sqrt(v) * inv_sbc2 + eps)                  (inv_sbc2 = 1 / sqrt(1 - beta2^j); sqrt
                                                        correctly rounded, as IEEE 754 requires)
  p  = p * decay - u * step                            (decay = 1 - lr wd, step = lr / bc1)
A tensor whose ``skip`` is set (its gradient held NaN or Inf) is left untouched.

Moments stored in bf16 / fp8 / int8 (`lowprec_step`): the same step between a decode and an
encode of the moments; its spec is that composition, ``state.load_moments`` (the first moment
zeroed where the second decodes to 0), the step above, zeroing after the update where asked
(compat="official" resets), ``state.store_moment``; a carrier all of whose pieces skip keeps its
stored moments (a skipped piece beside stepped ones is decoded and encoded with them). The native
kernel does it block by block.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LANES = 16
# per-tensor scalars of the elementwise step, in the order the native kernels read them
SCALARS = ("clip", "mh", "r", "f", "b1", "omb1", "b2", "omb2", "inv_sbc2", "eps", "decay", "step", "zero", "skip")


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


def sumsq_spec(x: torch.Tensor) -> torch.Tensor:
    """sum of x_i^2 in fp64 in the order defined above, as a 0-d tensor on x's device."""
    flat = x.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return flat.new_zeros(())
    pad = (-n) % LANES
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = _tree_rows((flat * flat).view(-1, LANES))
    return _tree_rows(lanes.view(LANES, 1))[0]


def _stat_table(rows: list[torch.Tensor], device) -> torch.Tensor:
    """[n, 2] fp64 on `device` from n rows of two 0-d tensors."""
    if not rows:
        return torch.zeros((0, 2), dtype=torch.float64, device=device)
    return torch.stack([torch.stack(r) for r in rows]).to(torch.float64)


def grad_stats(grads: list[torch.Tensor]) -> torch.Tensor:
    """[n, 2] fp64 on the gradients' device: (max |g|, sum g^2) per tensor; max |g| is +inf where
    the tensor holds NaN or Inf. Computed where the gradients are, never read back to the host."""
    device = grads[0].device if grads else torch.device("cpu")
    rows = []
    for g in grads:
        s = sumsq_spec(g)
        a = g.abs().max().to(torch.float64) if g.numel() else s.new_zeros(())
        rows.append((torch.where(torch.isfinite(s), a, math.inf), s))
    return _stat_table(rows, device)


def clip_hits(g: torch.Tensor, clip: torch.Tensor, mh: torch.Tensor) -> torch.Tensor:
    """The entries AdaClip rescales: ``|g| > mh`` where the tensor's ``clip`` flag (a 0-d tensor) is
    set; mh a 0-d tensor in g's dtype (fp32-exact)."""
    return (clip != 0) & (g.abs() > mh)


def clipped(g: torch.Tensor, clip: torch.Tensor, mh: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``clip and |g| > mh ? g * r : g`` (0-d tensors in g's dtype; the product in g's dtype)."""
    return torch.where(clip_hits(g, clip, mh), g * r, g)


def clip_stats(grads: list[torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """[n, 2] fp64: (sum of the clipped values squared, number of clipped entries) per tensor, where
    ``table[i] = (clip, mh, r)`` (fp64, on the gradients' device; mh, r fp32-exact); (0, 0) for a
    tensor whose clip is 0 (its gradient need not be read)."""
    device = grads[0].device if grads else torch.device("cpu")
    rows = []
    for g, (clip, mh, r) in zip(grads, _per_tensor(table, [g.dtype for g in grads])):
        s = sumsq_spec(clipped(g, clip, mh, r))
        rows.append((torch.where(clip != 0, s, 0.0), clip_hits(g, clip, mh).sum().to(torch.float64)))
    return _stat_table(rows, device)


def _per_tensor(table: torch.Tensor, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Row i of `table` (fp64; its values exact in fp32 where tensor i computes in fp32) in the
    compute dtype `dtypes[i]`."""
    as32 = table.to(torch.float32)
    return [as32[i] if d == torch.float32 else table[i].to(d) for i, d in enumerate(dtypes)]


def adam_step(params, grads, ms, vs, scalars: torch.Tensor, foreach: bool = True) -> None:
    """One elementwise step per tensor, in place on params, ms, vs (one foreach pass, or tensor by
    tensor). ``scalars`` is the [n, len(SCALARS)] fp64 table on the tensors' device: its values are
    used where they are, so the step never waits for the device. A tensor whose ``skip`` is set is
    left untouched."""
    rows = _per_tensor(scalars, [g.dtype for g in grads])
    if foreach:
        _adam_foreach(params, grads, ms, vs, rows)
    else:
        for i in range(len(params)):
            _adam_foreach([params[i]], [grads[i]], [ms[i]], [vs[i]], [rows[i]])


def _col(rows, name):
    i = SCALARS.index(name)
    return [r[i] for r in rows]


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """IEEE (correctly rounded) sqrt. torch's vectorised fp32 sqrt is not correctly rounded on
    every CPU (measured: 20 % of results 1 ulp off with AVX-512); the fp64 root of an fp32 value
    rounded to fp32 is (53 >= 2 * 24 + 2 bits)."""
    return torch.sqrt(v.double()).float() if v.dtype == torch.float32 else torch.sqrt(v)


def _adam_foreach(params, grads, ms, vs, rows) -> None:
    """The step with each tensor's scalars as 0-d tensors: flags select with torch.where, never
    with a branch on the host."""
    gs = [clipped(g, r[0], r[1], r[2]) for g, r in zip(grads, rows)]
    gs = torch._foreach_mul(gs, _col(rows, "f"))
    zero, skip = _col(rows, "zero"), _col(rows, "skip")
    m0 = [torch.where(z != 0, 0.0, m) for m, z in zip(ms, zero)]
    v0 = [torch.where(z != 0, 0.0, v) for v, z in zip(vs, zero)]
    m1 = torch._foreach_mul(m0, _col(rows, "b1"))
    torch._foreach_add_(m1, torch._foreach_mul(gs, _col(rows, "omb1")))
    v1 = torch._foreach_mul(v0, _col(rows, "b2"))
    sq = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(sq, _col(rows, "omb2"))
    torch._foreach_add_(v1, sq)
    denom = [_sqrt(v) for v in v1]
    torch._foreach_mul_(denom, _col(rows, "inv_sbc2"))
    torch._foreach_add_(denom, _col(rows, "eps"))
    upd = torch._foreach_div(m1, denom)
    torch._foreach_mul_(upd, _col(rows, "step"))
    p1 = torch._foreach_mul(params, _col(rows, "decay"))
    torch._foreach_sub_(p1, upd)
    for old, new, flags in ((params, p1, skip), (ms, m1, skip), (vs, v1, skip)):
        for t, x, k in zip(old, new, flags):
            t.copy_(torch.where(k != 0, t, x))


# The op functions of the registry's "optim" family: the native kernels' signatures.
optim_grad_stats = grad_stats
optim_clip_stats = clip_stats


def optim_adam_step(params, grads, ms, vs, scalars: torch.Tensor) -> None:
    adam_step(params, grads, ms, vs, scalars)
