"""Stable-SPAM: Adam with adaptive spike-aware gradient clipping (AdaClip), gradient norm
scaling (AdaGN) and momentum reset.

Keeps its moments through `lowbit.optim.state` (fp32, bf16 with stochastic rounding, fp8
E4M3/E5M2 per 1x128 block, int8 block-wise dynamic), computes in fp32, and skips a tensor whose
gradient holds NaN or Inf (counted in ``optimizer.stats["nonfinite_skipped"]``; its moments,
statistics and weights are left untouched).
"""
from __future__ import annotations

import math

import torch

from . import kernels, official
from . import state as S
from ._base import LowbitOptimizer, check_adam, check_fraction, check_grad, check_interval, check_unit
from .zero import reduce_pieces
from .zero_pieces import FlatPartitions, by_carrier


class StableSPAM(FlatPartitions, LowbitOptimizer):
    r"""Stable-SPAM (Huang et al., 2025, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam").

    For each tensor with gradient g at global step T (per-tensor statistics step k):

    * AdaClip: ``M_k = theta M_{k-1} + (1 - theta) max|g|``, ``M^ = M_k / (1 - theta^k)``;
      entries with ``|g| > M^`` are multiplied by ``M^ / max|g|`` (a rescale, as in the paper).
    * AdaGN on the clipped g: ``mu_k = g1 mu + (1 - g1) ||g||``, ``nu_k = gamma2 nu + (1 - gamma2) ||g||^2``,
      ``g <- g * (mu^ / (sqrt(nu^) + eps)) / ||g||`` with bias-corrected mu^, nu^ (g unchanged when ||g|| = 0).
    * Momentum reset every ``reset_interval`` global steps.
    * Optional cosine schedule: with ``total_steps`` set, beta1 and gamma1 are multiplied by
      ``s(T) = eta_min + (1 - eta_min)(1 + cos(pi T / total_steps)) / 2`` (so g1 = gamma1 s(T)).
    * Adam with decoupled weight decay:
      ``p <- p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``.

    Default (clean) mode, which differs from the official code where the official code is
    inexact (the quirks listed in `lowbit.optim.official`):

    * The AdaClip / AdaGN statistics count their own steps k, never reset (their EMAs are
      never reset either); the Adam moments count j, the steps since the last reset.
    * At a reset step (for a tensor without a gradient then: at its next step) the moments are
      zeroed *before* the update, so the step is a clean Adam restart on the current gradient
      (bias corrections for j = 1).
    * Bias corrections under the cosine schedule use the product of the factors actually
      applied (``1 - prod g1_i``, ``1 - prod beta1_i``), the exact correction of an EMA whose
      factor varies.
    * The cosine reaches eta_min at ``total_steps`` and stays there.
    * ``p.grad`` is never modified.

    ``compat="official"`` reproduces the authors' code (StableSPAM repository,
    ``galore_torch/stablespam.py``) including its quirks, listed in `lowbit.optim.official`.

    Both modes keep the scalar statistics in Python floats (float64); the official code keeps
    them as fp32 tensors, which differs in the last bits of fp32. Both modes skip tensors with
    non-finite gradients (the official code would write NaN into the moments).

    ``foreach=True`` (default) batches the elementwise work with ``torch._foreach_*`` ops and
    is bit-exact with ``foreach=False`` in fp32 state. The scalar statistics are read back to
    the host: the foreach path synchronises two or three times per step (per-tensor max, the
    clipped-entry count when something was clipped, norm), the per-tensor path per tensor.

    ``state_dtype`` selects the moment storage ("fp32", "bf16", "fp8", "int8"; see
    `lowbit.optim.state`); ``seed`` seeds the bf16 stochastic rounding (one stream per step,
    tensor and moment, so runs are reproducible and resume identically from a state_dict).
    ``param_rounding="stochastic"`` keeps bf16 / fp16 parameters as the master weights: the
    new value is computed in fp32 and stochastically rounded on store, so updates smaller than
    half a bf16 ulp still move the weights in expectation (with "nearest" they are lost).
    ``optimizer.stats`` counts steps, tensors skipped for non-finite gradients, gradient
    entries clipped by AdaClip and momentum resets.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7,
                 gamma2=0.9, theta=0.999, reset_interval=1000, total_steps=None, eta_min=0.5,
                 state_dtype="fp32", compat=None, foreach=True, seed=0, param_rounding="nearest"):
        defaults = check_adam(lr, betas, eps, weight_decay)
        defaults.update(gamma1=check_unit(gamma1, "gamma1"), gamma2=check_unit(gamma2, "gamma2"),
                        theta=check_unit(theta, "theta"),
                        reset_interval=check_interval(reset_interval, "reset_interval"),
                        total_steps=check_interval(total_steps, "total_steps"),
                        eta_min=check_fraction(eta_min, "eta_min"), global_step=0)
        S.check_state_dtype(state_dtype)
        if compat not in (None, "official"):
            raise ValueError(f"compat: expected None or 'official', got {compat!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.compat = compat
        self.foreach = bool(foreach)
        if param_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"param_rounding: expected 'nearest' or 'stochastic', got {param_rounding!r}")
        self.seed = seed
        self.param_rounding = param_rounding

    def _sr_param(self, p) -> bool:
        return self.param_rounding == "stochastic" and p.dtype in (torch.bfloat16, torch.float16)

    # ---- schedule -------------------------------------------------------------------------
    def _scale(self, group, T: int) -> float:
        total = group["total_steps"]
        if total is None:
            return 1.0
        eta = group["eta_min"]
        if self.compat == "official":
            return official.cosine_scale(T, total, eta)
        return eta + (1.0 - eta) * (1.0 + math.cos(math.pi * min(T, total) / total)) / 2.0

    # ---- per-tensor scalar statistics ---------------------------------------------------------
    def _init_scalars(self, st, group):
        st["step"] = 0
        st["clip_max"] = 0.0
        st["norm_mean"] = 0.0
        st["norm_sq_mean"] = 0.0
        if self.compat != "official":
            interval = group["reset_interval"]
            st["reset_epoch"] = group["global_step"] // interval if interval is not None else 0
            st["moment_step"] = 0
            st["gamma1_prod"] = 1.0
            st["beta1_prod"] = 1.0

    def _clip_scalars(self, st, group, amax: float):
        """Advance k and M; -> (clip?, threshold M^, ratio M^ / max|g|)."""
        theta = group["theta"]
        st["step"] += 1
        k = st["step"]
        st["clip_max"] = theta * st["clip_max"] + (1.0 - theta) * amax
        mhat = st["clip_max"] / (1.0 - theta ** k)
        clip = amax > mhat
        return clip, mhat, (mhat / amax if clip else 1.0)

    def _norm_factor(self, st, group, s: float, norm: float) -> float:
        """Advance mu, nu; -> the AdaGN multiplier mu^ / (sqrt(nu^) + eps) / ||g||."""
        g1 = group["gamma1"] * s
        g2 = group["gamma2"]
        k = st["step"]
        st["norm_mean"] = g1 * st["norm_mean"] + (1.0 - g1) * norm
        st["norm_sq_mean"] = g2 * st["norm_sq_mean"] + (1.0 - g2) * norm * norm
        if self.compat == "official":
            mu_hat = official.norm_mean_hat(st, g1)
        else:
            st["gamma1_prod"] *= g1
            mu_hat = st["norm_mean"] / (1.0 - st["gamma1_prod"])
        nu_hat = st["norm_sq_mean"] / (1.0 - g2 ** k)
        c = mu_hat / (math.sqrt(nu_hat) + group["eps"])
        return c / norm if norm > 0 else 1.0

    def _adam_scalars(self, st, group, s: float, T: int):
        """-> (beta1 used, zero moments before the update?, zero them after?, bc1, bc2)."""
        beta1 = group["betas"][0] * s
        beta2 = group["betas"][1]
        interval = group["reset_interval"]
        if self.compat == "official":
            return official.adam_scalars(st, beta1, beta2, interval, T)
        # a tensor without a gradient on the reset step is reset on its next step
        epoch = T // interval if interval is not None else 0
        reset = epoch != st["reset_epoch"]
        st["reset_epoch"] = epoch
        if reset:
            st["moment_step"] = 0
            st["beta1_prod"] = 1.0
        st["moment_step"] += 1
        st["beta1_prod"] *= beta1
        return beta1, reset, False, 1.0 - st["beta1_prod"], 1.0 - beta2 ** st["moment_step"]

    # ---- step -------------------------------------------------------------------------------
    def _step_group(self, group, index):
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            check_grad(p)
            self._check_known(p)
        T, plain, flats = self._advance(group, params)
        s = self._scale(group, T)
        interval = group["reset_interval"]
        if interval is not None and T % interval == 0:
            self.stats["resets"] += 1
        pieces = self._pieces(group, plain, flats, T)
        if pieces:
            self._step_pieces(group, pieces, index, T, s)

    def _step_pieces(self, group, pieces, index, T, s):
        self._local_stats(pieces)
        reduce_pieces(pieces, ("amax", "sumsq"), ("max", "sum"))

        live, clip_at = [], []
        for pc in pieces:
            if not self._finite_or_skip(pc.amax):
                continue
            if "step" not in pc.st:  # a tensor's scalars start at its first finite gradient
                self._init_scalars(pc.st, group)
            pc.clip, mhat, ratio = self._clip_scalars(pc.st, group, pc.amax)
            rnd = kernels.f32 if pc.compute_dtype == torch.float32 else float
            pc.mh, pc.r = rnd(mhat), rnd(ratio)
            pc.count = 0
            live.append(pc)
            if pc.clip:
                clip_at.append(pc)
        if not live:
            return

        # AdaClip changes the norm only of the tensors it clips: a second reduction for those
        todo = [pc for pc in clip_at if pc.length]
        for pc in clip_at:
            pc.sumsq, pc.count = 0.0, 0
        sums, counts = kernels.clip_stats([pc.grad for pc in todo], [pc.mh for pc in todo], [pc.r for pc in todo])
        for pc, q, c in zip(todo, sums, counts):
            pc.sumsq, pc.count = q, c
        reduce_pieces(clip_at, ("sumsq", "count"), ("sum", "sum"))
        for pc in clip_at:
            self.stats["clipped"] += int(pc.count)

        beta2 = group["betas"][1]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        for pc in live:
            f = self._norm_factor(pc.st, group, s, math.sqrt(pc.sumsq))
            beta1, pc.zero_before, pc.zero_after, bc1, bc2 = self._adam_scalars(pc.st, group, s, T)
            rnd = kernels.f32 if pc.compute_dtype == torch.float32 else float
            clip = pc.clip
            if clip and self.compat == "official" and pc.length:
                official.write_back_clipped(pc)
                clip = False
            pc.scalars = (1.0 if clip else 0.0, pc.mh, pc.r, rnd(f), rnd(beta1), rnd(1.0 - beta1), rnd(beta2),
                          rnd(1.0 - beta2), rnd(1.0 / math.sqrt(bc2)), rnd(group["eps"]), rnd(decay),
                          rnd(group["lr"] / bc1), 1.0 if pc.zero_before else 0.0)

        # moments: loaded once per carrier (a parameter, or a whole flat partition)
        steps = [pc for pc in live if pc.length]
        carriers = by_carrier(steps)
        for c, _ in carriers.values():
            st = self.state[c]
            if "exp_avg" not in st:
                S.init_moment(st, "exp_avg", c, self.state_dtype)
                S.init_moment(st, "exp_avg_sq", c, self.state_dtype)
        if self.state_dtype != "fp32" and self._fused_step(carriers, index, T):
            steps = [pc for pc in steps if id(pc.carrier) in carriers]
        moments = {key: (c, *S.load_moments(self.state[c], c.shape, self.state_dtype))
                   for key, (c, _) in carriers.items()}
        targets = {}
        for pc in steps:
            c = pc.carrier
            if id(c) not in targets:
                targets[id(c)] = c.float() if self._sr_param(c) else c
        kernels.adam_step([pc.view(targets[id(pc.carrier)]) for pc in steps], [pc.grad for pc in steps],
                          [pc.view(moments[id(pc.carrier)][1]) for pc in steps],
                          [pc.view(moments[id(pc.carrier)][2]) for pc in steps],
                          [pc.scalars for pc in steps], foreach=self.foreach)
        for pc in steps:
            if pc.zero_after:
                pc.view(moments[id(pc.carrier)][1]).zero_()
                pc.view(moments[id(pc.carrier)][2]).zero_()
        for key, (c, m, v) in moments.items():
            i = index[c]
            if targets[key] is not c:
                S.round_param_(c, targets[key], S.sr_seed(self.seed, T, i, 2))
            st = self.state[c]
            S.store_moment(st, "exp_avg", m, self.state_dtype, S.sr_seed(self.seed, T, i, 0))
            S.store_moment(st, "exp_avg_sq", v, self.state_dtype, S.sr_seed(self.seed, T, i, 1))

    def _fused_step(self, carriers: dict, index: dict, T: int) -> bool:
        """Step the carriers of bf16 / fp8 / int8 moments with the fused native kernel (decode, step and
        encode block by block, no fp32 copy of the moments; bit for bit the path in `_step_pieces`) and
        remove them from `carriers`. False where no native kernel serves it. fp32 parameters (and ZeRO
        flat partitions) with fp32 gradients only: bf16 / fp16 master weights, fp64 parameters and
        moments not in `store_moment`'s layout take the unfused path."""
        picked, stored = [], []
        for key, (c, pcs) in carriers.items():
            if c.dtype != torch.float32 or not c.is_contiguous():
                continue
            if any(pc.grad.dtype != torch.float32 or pc.grad.device != c.device for pc in pcs):
                continue
            mv = S.stored_moments(self.state[c], c, self.state_dtype)
            if mv is not None:
                picked.append(key)
                stored.append(mv)
        if not picked:
            return False
        params, grads, pieces, rows, seeds = [], [], [], [], []
        for ci, key in enumerate(picked):
            c, pcs = carriers[key]
            params.append(c)
            seeds.append((S.sr_seed(self.seed, T, index[c], 0), S.sr_seed(self.seed, T, index[c], 1)))
            for pc in pcs:
                pieces.append((ci, pc.start or 0, pc.length))
                grads.append(pc.grad.contiguous())
                rows.append(tuple(pc.scalars) + (1.0 if pc.zero_after else 0.0,))
        scaled = self.state_dtype != "bf16"
        books = S.int8_books(params[0].device) if self.state_dtype == "int8" else []
        done = kernels.lowprec_step(self.state_dtype, params, [mv[0] for mv in stored],
                                    [mv[1] for mv in stored] if scaled else [], [mv[2] for mv in stored],
                                    [mv[3] for mv in stored] if scaled else [], grads, pieces, rows, seeds, books)
        if done:
            for key in picked:
                del carriers[key]
        return done

    # ---- optimizer.stats travel with the state_dict ----------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["lowbit_stats"] = dict(self.stats)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        stats = state_dict.pop("lowbit_stats", None)
        super().load_state_dict(state_dict)
        if stats is not None:
            self.stats = dict(stats)

    def state_bytes(self) -> int:
        """Bytes of tensors held in the optimizer state (see `lowbit.optim.state`)."""
        return S.measured_state_bytes(self)

