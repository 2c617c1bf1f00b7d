"""CLASSP (Ludwig, 2024, "CLASSP: a Biologically-Inspired Approach to Continual Learning through
Adjustment Suppression and Sparsity Promotion")."""
from __future__ import annotations

import math
import numbers

import torch

from ._base import LowbitOptimizer, check_grad, check_nonneg
from .zero import reduce_table
from .zero_pieces import FlatPartitions, LocalRows


def _check_optional(value, name: str):
    return None if value is None else check_nonneg(value, name)


class CLASSP(FlatPartitions, LowbitOptimizer):
    r"""Generalised AdaGrad decay with a gradient threshold.

    For every weight w_i with gradient g_i, only where ``g_i^2 > threshold``:

        S_i <- S_i + |g_i|^p
        w_i <- w_i - lr * g_i / (eps + S_i)^(1/p)

    Weights whose squared gradient does not exceed the threshold are neither updated nor
    accumulated, so S_i counts the adjustments a weight has received ("adjustment
    suppression": often-updated weights learn slower) and most weights stay untouched on each
    step ("sparsity promotion"). p = 2 with threshold 0 is AdaGrad (with eps inside the root).

    Hyper-parameters as the paper names them: ``lr`` (alpha), ``threshold`` (on the squared
    gradient), ``eps`` (epsilon), ``p`` (the power).

    Defaults: the paper's code sets lr 0.2, threshold 0.5, eps 1e-5, p 1, absolute values tuned
    for its small classifiers. An LLM's gradient entries are 1e-5 to 1e-2 (smaller still after
    global-norm clipping), so ``g^2 > 0.5`` freezes nearly every weight and eps 1e-5 is as large
    as the gradients themselves. The defaults here are relative to each tensor's gradient at
    each step instead (g the tensor's whole gradient, ``rms = sqrt(mean(g^2))``):

    * ``threshold=None``: update where ``g_i^2 > rel_threshold * rms^2``; with the default
      ``rel_threshold=1`` that is ``|g_i| > rms``, about a third of the entries of a Gaussian
      gradient per step (fewer for the heavy-tailed gradients of an LLM), so each step stays
      sparse while the set of updated weights changes from step to step.
    * ``eps=None``: ``eps = rel_eps * rms^p`` (default rel_eps 1e-5: the paper's 1e-5 measured
      in units of the gradient's scale). S includes the current |g_i|^p, so an update never
      exceeds lr in size; eps only guards the division.
    * ``lr=1e-2``: with p = 1 an entry's first update is ``lr * g / (eps + |g|)``, about
      ``lr * sign(g)``, and its k-th about ``lr / k``, so lr is a per-weight step that then
      decays; it sits between Adam's LLM values, which barely move the loss under that decay
      (a 2-layer Llama on bytes, 200 steps: lr 1e-3 takes the loss from 5.6 to 5.0, 1e-2 to
      3.4, AdamW 1e-3 to 2.3), and the paper's 0.2, ten times the 0.02 standard deviation an
      LLM's weights start with (the same run's loss first rises to 6.2).

    The rule is invariant to the scale of the loss and of each layer's gradient, as the paper's
    rule is not. Explicit ``threshold`` / ``eps`` values are used as given (the paper's rule).
    Under DeepSpeed ZeRO the relative defaults need each tensor's whole gradient: with
    `lowbit.optim.zero.attach` the mean square is reduced over the ranks' slices; a flat
    partition without a layout is refused (with explicit values CLASSP is elementwise and
    steps any tensor).

    Two choices the paper's formula leaves open, made explicit here: the sum includes the
    current gradient (AdaGrad's convention, as the paper's code does; a sum over past steps
    only would divide the first update by eps^(1/p)), and it accumulates only where the weight
    is updated (the paper's code accumulates only on update; its threshold test compares a
    boolean with the threshold and its power is never applied, both fixed here).
    """

    def __init__(self, params, lr=1e-2, threshold=None, eps=None, p=1.0, rel_threshold=1.0, rel_eps=1e-5):
        lr = check_nonneg(lr, "lr")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"p: expected a finite number > 0, got {p!r}")
        super().__init__(params, dict(lr=lr, threshold=_check_optional(threshold, "threshold"),
                                      eps=_check_optional(eps, "eps"), p=float(p),
                                      rel_threshold=check_nonneg(rel_threshold, "rel_threshold"),
                                      rel_eps=check_nonneg(rel_eps, "rel_eps")))
        self.stats["updated"] = 0

    @property
    def elementwise_update(self) -> bool:
        """True when every group uses explicit values (no per-tensor statistic)."""
        return all(g["threshold"] is not None and g["eps"] is not None for g in self.param_groups)

    def _init_flat_state(self, fst, flat):
        fst["sum"] = torch.zeros_like(flat, memory_format=torch.contiguous_format)

    def _step_group(self, group, index):
        relative = group["threshold"] is None or group["eps"] is None
        params = [w for w in group["params"] if w.grad is not None]
        for w in params:
            check_grad(w)
            if relative:
                self._check_known(w)
        flats = [w for w in params if self._is_flat(w)]
        plain = [w for w in params if w.numel() and not self._is_flat(w)]
        by_device: dict = {}
        for pc in self._pieces(group, plain, flats, 0):
            by_device.setdefault(pc.carrier.device, []).append(pc)
        for device, pieces in by_device.items():
            # statistics, thresholds and the skip of a non-finite gradient stay on the device: reading
            # them would wait for it (a sync per tensor on a GPU)
            stats = self._stat_table(pieces, LocalRows(pieces, device))
            if relative:  # the mean square of each whole tensor, over the ranks' slices
                reduce_table(pieces, stats, ("max", "sum"))
            live = torch.isfinite(stats[:, 0])
            self._count("nonfinite_skipped", (~live).sum())
            for i, pc in enumerate(pieces):
                if not pc.length:
                    continue
                ms = stats[i, 1] / pc.numel
                thr = group["rel_threshold"] * ms if group["threshold"] is None else group["threshold"]
                if group["eps"] is None:  # never 0: |g|^p of a tiny entry may underflow to 0 in S
                    eps = (group["rel_eps"] * ms ** (group["p"] / 2)).clamp(min=torch.finfo(pc.compute_dtype).tiny)
                else:
                    eps = group["eps"]
                self._update(pc, group, thr, eps, live[i])

    def _update(self, pc, group, threshold, eps, live) -> None:
        st = self.state[pc.carrier]
        if "sum" not in st:
            st["sum"] = torch.zeros_like(pc.carrier, dtype=pc.compute_dtype, memory_format=torch.contiguous_format)
        g, power = pc.grad, group["p"]
        acc, w = pc.view(st["sum"]), pc.view(pc.carrier)
        mask = (g * g > threshold) & live
        a = g.abs()
        acc.add_(torch.where(mask, a if power == 1.0 else a.pow(power), 0.0))
        denom = acc.add(eps)
        if power != 1.0:
            denom.pow_(1.0 / power)
        w.sub_(torch.where(mask, g / denom, 0.0) * group["lr"])
        self._count("updated", mask.sum())
