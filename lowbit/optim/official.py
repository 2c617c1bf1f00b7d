"""Stable-SPAM as the authors' code computes it (``StableSPAM(compat="official")``).

The StableSPAM repository's ``galore_torch/stablespam.py`` differs from the paper's method in
the quirks below; the functions here and `lowbit.optim.spam_scalars` (its ``official`` mode)
reproduce them, and the default (clean) mode of `lowbit.optim.StableSPAM` avoids them:

1. One per-tensor counter k serves AdaClip, AdaGN and Adam, and the reset sets it to 1
   without resetting ``M``, ``mu``, ``nu``. After a reset the statistics are therefore
   divided by ``1 - theta^k`` with a small k although the EMAs are warm: ``M^`` is inflated
   about 500x right after a reset (theta = 0.999), i.e. AdaClip is effectively off for
   hundreds of steps after every reset.
2. The reset replaces the stored moments by zeros, but the reset step itself still updates
   the *old* moment tensors and uses them with the k = 1 bias corrections ``1 - beta1``,
   ``1 - beta2``; the new zeros are first used at the following step (with k = 2).
3. Under the cosine schedule the bias corrections use the current factor to the power k
   (``1 - (gamma1 s(T))^k``, ``1 - (beta1 s(T))^k``), not the product of the factors applied.
4. The cosine comes from ``CosineAnnealingLR(T_max=total_steps + 1)`` evaluated at T, so it
   reaches eta_min at ``total_steps + 1`` and then rises again (it is periodic), returning to
   1 at ``2 (total_steps + 1)``.
5. Entries clipped by AdaClip are written back into ``p.grad`` (the caller sees the clipped
   gradient after ``step()``).
6. Bias corrections use k (per tensor) while the reset and the cosine use the global step T,
   so a tensor that had no gradient on some step lags; one without a gradient on a reset
   step is not reset in that interval at all. The clean mode keeps per-tensor counts too
   (they count the EMA updates actually made) but resets such a tensor on its next step.
"""
from __future__ import annotations

import math

from . import kernels


def cosine_scale(T: int, total: int, eta_min: float) -> float:
    """The cosine factor s(T) (quirk 4)."""
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * T / (total + 1))) / 2.0


def write_back_clipped(pc, clip, mh, r) -> None:
    """Where `clip` (a 0-d bool tensor), clip the piece's gradient with the fp32 threshold `mh` and
    ratio `r` (0-d tensors) and write it into ``p.grad`` (quirk 5); selected on the device."""
    pc.grad = kernels.clipped(pc.grad, clip, mh.to(pc.grad.dtype), r.to(pc.grad.dtype))
    pc.grad_out().copy_(pc.grad)
