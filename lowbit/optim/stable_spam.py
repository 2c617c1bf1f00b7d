"""Stable-SPAM and SPAM: Adam with spike-aware gradient clipping and momentum reset.

Both keep their moments through `lowbit.optim.state` (fp32, bf16 with stochastic rounding,
fp8 E4M3/E5M2 per 1x128 block, int8 block-wise dynamic), compute in fp32, and skip a tensor
whose gradient holds NaN or Inf (counted in ``optimizer.stats["nonfinite_skipped"]``; its
moments, statistics and weights are left untouched).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.optim import Optimizer

from . import kernels
from . import state as S

_INF = float("inf")


# ---- argument checks and bookkeeping shared with classp.py ----
def check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def check_unit(value, name: str) -> float:
    """A decay factor in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def check_betas(betas) -> tuple:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    return check_unit(betas[0], "betas[0]"), check_unit(betas[1], "betas[1]")


def check_interval(value, name: str, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_params(optimizer: Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"params: complex parameters are not supported (got {p.dtype}); "
                                "optimize torch.view_as_real(param) instead")
            if not p.is_floating_point():
                raise TypeError(f"params: expected floating-point parameters, got {p.dtype}")


def check_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    if g.is_sparse:
        raise TypeError("grad: sparse gradients are not supported (use dense gradients, e.g. "
                        "nn.Embedding(sparse=False))")
    if g.is_complex() or p.is_complex():
        raise TypeError(f"params: complex parameters are not supported (got {p.dtype})")
    return g


def new_stats() -> dict:
    return {"steps": 0, "nonfinite_skipped": 0, "clipped": 0, "resets": 0}


def _finite(x: float) -> bool:
    return math.isfinite(x)


class _Piece:
    """One original tensor as this rank sees it: the whole parameter, or its slice of a ZeRO flat
    partition (``length`` 0 where this rank holds none of it; its statistics still advance)."""

    def __init__(self, st, carrier, start, length, group, numel=None):
        self.st, self.carrier, self.start, self.length, self.group = st, carrier, start, length, group
        self.numel = length if numel is None else numel
        self.compute_dtype = S.compute_dtype(carrier)
        self.amax, self.sumsq, self.count, self.clip = 0.0, 0.0, 0, False
        self.grad = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.start is None else t.narrow(0, self.start, self.length)

    def grad_out(self) -> torch.Tensor:
        return self.view(self.carrier.grad)

    def grad_view(self) -> torch.Tensor:
        return self.grad_out().to(self.compute_dtype)


# =============================================================================================
# Stable-SPAM
# =============================================================================================
class StableSPAM(S.ExactStateLoad, Optimizer):
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
    inexact, in the quirks listed below:

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
    ``galore_torch/stablespam.py``) including its quirks:

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
        lr = check_nonneg(lr, "lr")
        betas = check_betas(betas)
        eps = check_nonneg(eps, "eps")
        weight_decay = check_nonneg(weight_decay, "weight_decay")
        gamma1 = check_unit(gamma1, "gamma1")
        gamma2 = check_unit(gamma2, "gamma2")
        theta = check_unit(theta, "theta")
        reset_interval = check_interval(reset_interval, "reset_interval")
        total_steps = check_interval(total_steps, "total_steps")
        if isinstance(eta_min, bool) or not isinstance(eta_min, numbers.Real) or not 0.0 <= eta_min <= 1.0:
            raise ValueError(f"eta_min: expected a number in [0, 1], got {eta_min!r}")
        S.check_state_dtype(state_dtype)
        if compat not in (None, "official"):
            raise ValueError(f"compat: expected None or 'official', got {compat!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1, gamma2=gamma2,
                        theta=theta, reset_interval=reset_interval, total_steps=total_steps,
                        eta_min=float(eta_min), global_step=0)
        super().__init__(params, defaults)
        check_params(self)
        self.state_dtype = state_dtype
        self.compat = compat
        self.foreach = bool(foreach)
        if param_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"param_rounding: expected 'nearest' or 'stochastic', got {param_rounding!r}")
        self.seed = seed
        self.param_rounding = param_rounding
        self.stats = new_stats()

    def _sr_param(self, p) -> bool:
        return self.param_rounding == "stochastic" and p.dtype in (torch.bfloat16, torch.float16)

    # ---- schedule -------------------------------------------------------------------------
    def _scale(self, group, T: int) -> float:
        total = group["total_steps"]
        if total is None:
            return 1.0
        eta = group["eta_min"]
        if self.compat == "official":
            return eta + (1.0 - eta) * (1.0 + math.cos(math.pi * T / (total + 1))) / 2.0
        return eta + (1.0 - eta) * (1.0 + math.cos(math.pi * min(T, total) / total)) / 2.0

    # ---- ZeRO partitions (see lowbit.optim.zero) ---------------------------------------------
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        # remembered so that a step on tensors this optimizer was never given (DeepSpeed's flat
        # ZeRO partitions without `lowbit.optim.zero.attach`) fails instead of computing the
        # per-tensor statistics over a whole partition
        given = self.__dict__.setdefault("_given", set())
        given.update(id(p) for p in self.param_groups[-1]["params"])

    def set_partition_layout(self, layout) -> None:
        """Use `layout` (a `lowbit.optim.zero.PartitionLayout`, or None) to map the flat partitions
        DeepSpeed steps this optimizer on back to the original tensors. Called by `zero.attach`."""
        self._layout = layout

    def _is_flat(self, p) -> bool:
        layout = getattr(self, "_layout", None)
        return layout is not None and layout.covers(p)

    def _check_known(self, p) -> None:
        given = getattr(self, "_given", None)
        if given is not None and id(p) not in given and not self._is_flat(p):
            raise RuntimeError(
                "StableSPAM.step: a parameter this optimizer was not constructed with (a DeepSpeed ZeRO "
                "flat partition?). Per-tensor statistics would be computed over the whole partition; "
                "call lowbit.optim.zero.attach(engine) after deepspeed.initialize(...)")

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
            mu_hat = st["norm_mean"] / (1.0 - g1 ** k)
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
            reset = interval is not None and T % interval == 0
            if reset:
                st["step"] = 1
            k = st["step"]
            return beta1, False, reset, 1.0 - beta1 ** k, 1.0 - beta2 ** k
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
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                check_grad(p)
                self._check_known(p)
            flats = [p for p in params if self._is_flat(p)]
            plain = [p for p in params if p.numel() and not self._is_flat(p)]
            if flats:
                # DeepSpeed steps the flat partitions of a group one call at a time (ZeRO 3 sub
                # groups): each flat counts its own steps, so T is right however they are called
                T = self.state[flats[0]].get("global_step", group["global_step"]) + 1
                group["global_step"] = T
            else:
                group["global_step"] += 1
                T = group["global_step"]
            s = self._scale(group, T)
            interval = group["reset_interval"]
            if interval is not None and T % interval == 0:
                self.stats["resets"] += 1
            pieces = [_Piece(self.state[p], p, None, p.numel(), None) for p in plain]
            for flat in flats:
                pieces += self._flat_pieces(group, flat, T)
            if pieces:
                self._step_pieces(group, pieces, index, T, s)
        self.stats["steps"] += 1
        return loss

    def _flat_pieces(self, group, flat, T):
        if flat.dtype != torch.float32:
            raise TypeError(f"params: ZeRO flat partitions are expected in fp32, got {flat.dtype}")
        fl = self._layout.flat(flat)
        fst = self.state[flat]
        if "tensors" not in fst:
            fst["tensors"] = []
            for _ in fl.tensors:
                sc = {}
                self._init_scalars(sc, group)
                fst["tensors"].append(sc)
            S.init_moment(fst, "exp_avg", flat, self.state_dtype)
            S.init_moment(fst, "exp_avg_sq", flat, self.state_dtype)
        if len(fst["tensors"]) != len(fl.tensors):
            raise RuntimeError(f"StableSPAM: the state holds statistics of {len(fst['tensors'])} tensors for a "
                               f"partition of {len(fl.tensors)} (a checkpoint of another model or grouping?)")
        fst["global_step"] = T
        return [_Piece(sc, flat, t.start, t.length, fl.group, t.numel)
                for sc, t in zip(fst["tensors"], fl.tensors) if t.numel]

    def _step_pieces(self, group, pieces, index, T, s):
        from . import zero

        local = [pc for pc in pieces if pc.length]
        for pc in local:
            pc.grad = pc.grad_view()
        amax_l, sumsq_l = kernels.grad_stats([pc.grad for pc in local])
        for pc, a, q in zip(local, amax_l, sumsq_l):
            pc.amax, pc.sumsq = a, q
        zero.reduce_pieces(pieces, ("amax", "sumsq"), ("max", "sum"))

        live, clip_at = [], []
        for pc in pieces:
            if not _finite(pc.amax):
                self.stats["nonfinite_skipped"] += 1
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
        zero.reduce_pieces(clip_at, ("sumsq", "count"), ("sum", "sum"))
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
                # quirk 5: the clipped gradient is written back into p.grad
                pc.grad = kernels.clipped(pc.grad, pc.mh, pc.r)
                pc.grad_out().copy_(pc.grad)
                clip = False
            pc.scalars = (1.0 if clip else 0.0, pc.mh, pc.r, rnd(f), rnd(beta1), rnd(1.0 - beta1), rnd(beta2),
                          rnd(1.0 - beta2), rnd(1.0 / math.sqrt(bc2)), rnd(group["eps"]), rnd(decay),
                          rnd(group["lr"] / bc1), 1.0 if pc.zero_before else 0.0)

        # moments: loaded once per carrier (a parameter, or a whole flat partition)
        steps = [pc for pc in live if pc.length]
        carriers = {}
        for pc in steps:
            key = id(pc.carrier)
            if key not in carriers:
                st = self.state[pc.carrier]
                if "exp_avg" not in st:
                    S.init_moment(st, "exp_avg", pc.carrier, self.state_dtype)
                    S.init_moment(st, "exp_avg_sq", pc.carrier, self.state_dtype)
                carriers[key] = (pc.carrier, [])
            carriers[key][1].append(pc)
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


# =============================================================================================
# SPAM
# =============================================================================================
class SPAM(S.ExactStateLoad, Optimizer):
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

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, theta=5000.0,
                 reset_interval=500, warmup_steps=150, clip_delay=20, state_dtype="fp32", seed=0):
        lr = check_nonneg(lr, "lr")
        betas = check_betas(betas)
        eps = check_nonneg(eps, "eps")
        weight_decay = check_nonneg(weight_decay, "weight_decay")
        theta = check_nonneg(theta, "theta")
        reset_interval = check_interval(reset_interval, "reset_interval")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
        if isinstance(clip_delay, bool) or not isinstance(clip_delay, numbers.Integral) or clip_delay < 0:
            raise ValueError(f"clip_delay: expected an int >= 0, got {clip_delay!r}")
        S.check_state_dtype(state_dtype)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, theta=theta,
                        reset_interval=reset_interval, warmup_steps=int(warmup_steps), clip_delay=int(clip_delay),
                        global_step=0)
        super().__init__(params, defaults)
        check_params(self)
        self.state_dtype = state_dtype
        self.seed = seed
        self.stats = new_stats()

    @staticmethod
    def warmup_factor(T: int, reset_interval, warmup_steps: int) -> float:
        if reset_interval is None or T < reset_interval:
            return 1.0
        t = T % reset_interval
        if t >= warmup_steps:
            return 1.0
        return 1.0 - 0.99 * (1.0 + math.cos(math.pi * t / (warmup_steps + 1))) / 2.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            group["global_step"] += 1
            T = group["global_step"]
            interval = group["reset_interval"]
            reset = interval is not None and T % interval == 0
            if reset:
                self.stats["resets"] += 1
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
                if not _finite(torch.linalg.vector_norm(g, _INF).item()):
                    self.stats["nonfinite_skipped"] += 1
                    continue
                g = g.to(S.compute_dtype(p))
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    S.init_moment(st, "exp_avg", p, self.state_dtype)
                    S.init_moment(st, "exp_avg_sq", p, self.state_dtype)
                m, v = S.load_moments(st, p.shape, self.state_dtype)
                if reset:
                    m.zero_()
                    v.zero_()
                st["step"] += 1
                k = st["step"]
                if clip_on:
                    bound = v * group["theta"]
                    mask = (g * g > bound) & (v > 0)
                    n = int(mask.sum())
                    if n:
                        g = torch.where(mask, torch.copysign(bound.sqrt_(), g), g)
                        self.stats["clipped"] += n
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = v.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** k) / (1.0 - beta1 ** k)
                p.addcdiv_(m, denom, value=-step_size * w)
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                i = index[p]
                S.store_moment(st, "exp_avg", m, self.state_dtype, S.sr_seed(self.seed, T, i, 0))
                S.store_moment(st, "exp_avg_sq", v, self.state_dtype, S.sr_seed(self.seed, T, i, 1))
        self.stats["steps"] += 1
        return loss

    def state_bytes(self) -> int:
        return S.measured_state_bytes(self)
