"""SPAM: Adam with spike-aware clipping, momentum reset and a warm-up after each reset.

Keeps its moments through `lowbit.optim.state` and skips a tensor whose gradient holds NaN or
Inf (counted in ``optimizer.stats["nonfinite_skipped"]``), deciding on the device: a step reads
nothing back to the host. Under DeepSpeed ZeRO each flat
partition counts its own steps, so the reset and warm-up schedule follows training steps however
many ``step()`` calls DeepSpeed makes per training step (one per ZeRO 3 sub group).
"""
from __future__ import annotations

import math

import torch

from . import state as S
from ._base import LowbitOptimizer, check_adam, check_count, check_grad, check_interval, check_nonneg
from ._device import upload


class SPAM(LowbitOptimizer):
    r"""SPAM (Huang et al., 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training").

    Per tensor at global step T (per-tensor step k, never reset, as in the paper and code):

    * Momentum reset: every ``reset_interval`` steps m and v are zeroed before the update.
    * Warm-up: from a reset on, the update is scaled by
      ``w(t) = 1 - 0.99 (1 + cos(pi t / (warmup_steps + 1))) / 2`` for ``t < warmup_steps``
      (t = steps since the reset, 0 at the reset step; w(0) = 0.01), and 1 afterwards and
      before the first reset.
    * Spike-aware clipping: entries with ``g^2 > theta v`` (v the stored second moment before
      this step) are set to ``sign(g) sqrt(theta v)``; not applied while fewer than
      ``clip_delay`` steps have passed since the start or the last reset (v is still small).
    * Adam: ``p <- p - lr w(t) sqrt(1 - beta2^k) / (1 - beta1^k) * m / (sqrt(v) + eps)``, then
      decoupled weight decay ``p <- p (1 - lr wd)``.

    Differences from the official code (``galore_torch/SPAM.py``):

    * There the reset interval is only read from parameter groups that carry a GaLore-style
      ``density``; otherwise it stays 1e9 and the momentum is never reset. Here
      ``reset_interval`` always applies.
    * Entries with ``v = 0`` (no gradient seen yet, or a second moment that underflowed in
      int8 / fp8 storage) are not clipped. The official test ``g^2 > theta * 0`` clips them to
      ``sign(g) * 0``, so an entry whose gradient stayed zero past ``clip_delay`` steps (an
      unused embedding row) never moves again.
    * The sparse-momentum (``density``) mode is not provided.
    """

    elementwise_update = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, theta=5000.0,
                 reset_interval=500, warmup_steps=150, clip_delay=20, state_dtype="fp32", seed=0):
        defaults = check_adam(lr, betas, eps, weight_decay)
        defaults.update(theta=check_nonneg(theta, "theta"),
                        reset_interval=check_interval(reset_interval, "reset_interval"),
                        warmup_steps=check_count(warmup_steps, "warmup_steps"),
                        clip_delay=check_count(clip_delay, "clip_delay"), global_step=0)
        S.check_state_dtype(state_dtype)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.seed = seed

    @staticmethod
    def warmup_factor(T: int, reset_interval, warmup_steps: int) -> float:
        if reset_interval is None or T < reset_interval:
            return 1.0
        t = T % reset_interval
        if t >= warmup_steps:
            return 1.0
        return 1.0 - 0.99 * (1.0 + math.cos(math.pi * t / (warmup_steps + 1))) / 2.0

    def _step_group(self, group, index):
        # a ZeRO flat partition counts its own steps (see `LowbitOptimizer._clock`)
        T = self._clock(group, self._partitions(group["params"]))
        interval = group["reset_interval"]
        reset = interval is not None and T % interval == 0
        if reset:
            self._stats["resets"] += 1
        since = T if interval is None or T < interval else T % interval
        clip_on = group["theta"] > 0 and T >= group["clip_delay"] and since >= group["clip_delay"]
        w = self.warmup_factor(T, interval, group["warmup_steps"])
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = check_grad(p)
            if not p.numel():
                continue
            # a gradient holding NaN / Inf leaves the tensor as it was: selected on the device, since
            # reading the flag would wait for it (a sync per tensor on a GPU)
            live = torch.isfinite(g).all()
            self._count("nonfinite_skipped", ~live)
            g = g.to(S.compute_dtype(p))
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                S.init_moment(st, "exp_avg", p, self.state_dtype)
                S.init_moment(st, "exp_avg_sq", p, self.state_dtype)
            elif not isinstance(st["step"], torch.Tensor):  # a state saved by an earlier version
                st["step"] = upload(float(st["step"]), torch.float64, p.device)
            m, v = S.load_moments(st, p.shape, self.state_dtype)
            if reset:
                m, v = torch.zeros_like(m), torch.zeros_like(v)
            k = st["step"] + 1.0
            if clip_on:
                bound = v * group["theta"]
                spike = (g * g > bound) & (v > 0)
                self._count("clipped", (spike & live).sum())
                g = torch.where(spike, torch.copysign(bound.sqrt_(), g), g)
            m = m.mul(beta1).add_(g, alpha=1.0 - beta1)
            v = v.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = v.sqrt().add_(group["eps"])
            step_size = torch.sqrt(1.0 - torch.pow(beta2, k)) * group["lr"] / (1.0 - torch.pow(beta1, k))
            new = p - (m / denom) * (step_size * w).to(p.dtype)
            if group["weight_decay"]:
                new.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.copy_(torch.where(live, new, p))
            st["step"] = torch.where(live, k, st["step"])
            i = index[p]
            S.store_moments(st, m, v, self.state_dtype, (S.sr_seed(self.seed, T, i, 0), S.sr_seed(self.seed, T, i, 1)),
                            live)

    def state_bytes(self) -> int:
        return S.measured_state_bytes(self)
