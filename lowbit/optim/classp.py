"""CLASSP (Ludwig, 2024, "CLASSP: a Biologically-Inspired Approach to Continual Learning through
Adjustment Suppression and Sparsity Promotion")."""
from __future__ import annotations

import math
import numbers

import torch

from ._base import LowbitOptimizer, check_nonneg
from .state import compute_dtype


class CLASSP(LowbitOptimizer):
    r"""Generalised AdaGrad decay with a gradient threshold.

    For every weight w_i with gradient g_i, only where ``g_i^2 > threshold``:

        S_i <- S_i + |g_i|^p
        w_i <- w_i - lr * g_i / (eps + S_i)^(1/p)

    Weights whose squared gradient does not exceed the threshold are neither updated nor
    accumulated, so S_i counts the adjustments a weight has received ("adjustment
    suppression": often-updated weights learn slower) and most weights stay untouched on each
    step ("sparsity promotion"). p = 2 with threshold 0 is AdaGrad (with eps inside the root).

    Hyper-parameters as the paper names them: ``lr`` (alpha), ``threshold`` (on the squared
    gradient), ``eps`` (epsilon), ``p`` (the power); the defaults are the paper's code
    defaults (lr 0.2, threshold 0.5, eps 1e-5, p 1).

    Two choices the paper's formula leaves open, made explicit here: the sum includes the
    current gradient (AdaGrad's convention, as the paper's code does; a sum over past steps
    only would divide the first update by eps^(1/p)), and it accumulates only where the weight
    is updated (the paper's code accumulates only on update; its threshold test compares a
    boolean with the threshold and its power is never applied, both fixed here).
    """

    elementwise_update = True

    def __init__(self, params, lr=0.2, threshold=0.5, eps=1e-5, p=1.0):
        lr = check_nonneg(lr, "lr")
        threshold = check_nonneg(threshold, "threshold")
        eps = check_nonneg(eps, "eps")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"p: expected a finite number > 0, got {p!r}")
        super().__init__(params, dict(lr=lr, threshold=threshold, eps=eps, p=float(p)))
        self.stats["updated"] = 0

    def _step_group(self, group, index):
        power = group["p"]
        for w, g in self._finite_grads(group["params"]):
            st = self.state[w]
            if "sum" not in st:
                st["sum"] = torch.zeros_like(w, dtype=compute_dtype(w), memory_format=torch.contiguous_format)
            mask = g * g > group["threshold"]
            a = g.abs()
            st["sum"].add_(torch.where(mask, a if power == 1.0 else a.pow(power), 0.0))
            denom = st["sum"].add(group["eps"])
            if power != 1.0:
                denom.pow_(1.0 / power)
            w.sub_(torch.where(mask, g / denom, 0.0) * group["lr"])
            self.stats["updated"] += int(mask.sum())
