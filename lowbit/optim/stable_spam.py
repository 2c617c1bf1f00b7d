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
from . import spam_scalars as SC
from . import state as S
from ._base import LowbitOptimizer, check_adam, check_fraction, check_grad, check_interval, check_unit
from ._device import upload
from .zero import reduce_table
from .zero_pieces import FlatPartitions, LocalRows, by_carrier


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

    Both modes keep each tensor's scalar statistics as a row of fp64 values on its device
    (`lowbit.optim.spam_scalars`; the official code keeps fp32 tensors, which differs in the last
    bits of fp32), and skip tensors with non-finite gradients (the official code would write NaN
    into the moments). A step reads nothing back to the host: the statistics, the clipping
    decisions and the skip of a non-finite gradient are device tensors that the step kernels read
    where they are, so on a GPU a step never waits for the device. ``optimizer.stats`` adds up the
    device's counts when it is read.

    ``foreach=True`` (default) batches the elementwise work of the spec (the path for tensors no
    native kernel takes) with ``torch._foreach_*`` ops; it is bit-exact with ``foreach=False``.

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
    def _state_row(self, st: dict, group: dict, epoch: int, device) -> torch.Tensor:
        """The fp64 row of the scalar statistics (`spam_scalars.COLS`) kept in `st` ("scalars"),
        started the first time the tensor is stepped, or converted from a state saved as Python
        floats by an earlier version."""
        row = st.get("scalars")
        if row is None:
            if "step" in st:
                row = upload(SC.pop_floats(st, group["theta"], group["gamma2"], group["betas"][1]), torch.float64,
                             device)
            else:
                row = SC.initial(epoch, device)
            st["scalars"] = row
        return row

    # ---- step -------------------------------------------------------------------------------
    def _step_group(self, group, index):
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            check_grad(p)
            self._check_known(p)
        T, plain, flats = self._advance(group, params)
        interval = group["reset_interval"]
        if interval is not None and T % interval == 0:
            self._stats["resets"] += 1
        buckets: dict[tuple, list] = {}  # the scalars of a step live on one device, in one rounding
        for pc in self._pieces(group, plain, flats, T):
            buckets.setdefault((pc.carrier.device, pc.compute_dtype), []).append(pc)
        s = self._scale(group, T)
        for pieces in buckets.values():
            self._step_pieces(group, pieces, index, T, s)

    def _step_pieces(self, group, pieces, index, T, s):
        """One step of `pieces` (one device, one compute dtype): statistics, scalars and the
        elementwise step, all on the device."""
        device = pieces[0].carrier.device
        fp32 = pieces[0].compute_dtype == torch.float32
        interval = group["reset_interval"]
        epoch = T // interval if interval is not None else 0
        authors = self.compat == "official"

        local = LocalRows(pieces, device)
        stats = self._stat_table(pieces, local)
        reduce_table(pieces, stats, ("max", "sum"))
        state = torch.stack([self._state_row(pc.st, group, epoch, device) for pc in pieces])
        sc = SC.Step(state, stats[:, 0], authors, fp32)
        table = sc.clip(group["theta"])

        # AdaClip changes the norm of the tensors it clips: their sum of squares again, on the device
        clipped = local.spread(kernels.clip_stats([pieces[i].grad for i in local.at], local.pick(table))
                               if local.at else None)
        reduce_table(pieces, clipped, ("sum", "sum"))
        self._count("clipped", clipped[:, 1].sum())
        self._count("nonfinite_skipped", (~sc.live).sum())

        f = sc.norm_factor(torch.where(sc.clipping, clipped[:, 0], stats[:, 1]), group["gamma1"] * s,
                           group["gamma2"], group["eps"])
        beta1, beta2 = group["betas"][0] * s, group["betas"][1]
        bc1, bc2, zero_before, zero_after = sc.adam(beta1, beta2, epoch,
                                                    reset=interval is not None and T % interval == 0)
        rnd = kernels.f32 if fp32 else float
        consts = dict(b1=rnd(beta1), omb1=rnd(1.0 - beta1), b2=rnd(beta2), omb2=rnd(1.0 - beta2),
                      eps=rnd(group["eps"]), decay=rnd(1.0 - group["lr"] * group["weight_decay"]), lr=group["lr"])
        if authors:  # the clipped gradient goes into p.grad, and the step reads it from there
            for i in local.at:
                official.write_back_clipped(pieces[i], sc.clipping[i], table[i, 1], table[i, 2])
        rows = sc.rows(f, bc1, bc2, zero_before, consts, clip_in_step=not authors)
        torch._foreach_copy_([pc.st["scalars"] for pc in pieces], list(sc.new_state().unbind(0)))
        if local.at:
            steps = [pieces[i] for i in local.at]
            for pos, pc in enumerate(steps):
                pc.pos = pos
            self._elementwise(steps, local.pick(rows), local.pick(zero_after), local.pick(sc.live), index, T)

    def _elementwise(self, steps, rows, zero_after, live, index, T):
        """The step of each piece this rank holds (``steps[i].pos == i``, the pieces of a carrier
        adjacent): ``rows`` its scalars, ``zero_after`` where its moments are zeroed after the
        update, ``live`` where its gradient is finite (device tensors)."""
        carriers = by_carrier(steps)
        for c, _ in carriers.values():
            st = self.state[c]
            if "exp_avg" not in st:
                S.init_moment(st, "exp_avg", c, self.state_dtype)
                S.init_moment(st, "exp_avg_sq", c, self.state_dtype)
        if self.state_dtype != "fp32" and self._fused_step(carriers, rows, zero_after, index, T):
            steps = [pc for pc in steps if id(pc.carrier) in carriers]
            if not steps:
                return
            rows = rows.index_select(0, upload([pc.pos for pc in steps], torch.int64, rows.device))
        moments = {key: (c, *S.load_moments(self.state[c], c.shape, self.state_dtype))
                   for key, (c, _) in carriers.items()}
        targets = {}
        for pc in steps:
            c = pc.carrier
            if id(c) not in targets:
                targets[id(c)] = c.float() if self._sr_param(c) else c
        kernels.adam_step([pc.view(targets[id(pc.carrier)]) for pc in steps], [pc.grad for pc in steps],
                          [pc.view(moments[id(pc.carrier)][1]) for pc in steps],
                          [pc.view(moments[id(pc.carrier)][2]) for pc in steps], rows, foreach=self.foreach)
        if self.compat == "official":
            for pc in steps:
                for t in moments[id(pc.carrier)][1:]:
                    pc.view(t).masked_fill_(zero_after[pc.pos], 0.0)
        for key, (c, m, v) in moments.items():
            i = index[c]
            if targets[key] is not c:
                S.round_param_(c, targets[key], S.sr_seed(self.seed, T, i, 2))
            pcs = carriers[key][1]
            # fp32 moments are updated in place, skipped pieces untouched; stored ones are encoded again,
            # so a carrier none of whose pieces stepped keeps what it had
            stepped = None if self.state_dtype == "fp32" else live[pcs[0].pos:pcs[-1].pos + 1].any()
            S.store_moments(self.state[c], m, v, self.state_dtype,
                            (S.sr_seed(self.seed, T, i, 0), S.sr_seed(self.seed, T, i, 1)), stepped)

    def _fused_step(self, carriers: dict, rows, zero_after, index: dict, T: int) -> bool:
        """Step the carriers of bf16 / fp8 / int8 moments with the fused native kernel (decode, step and
        encode block by block, no fp32 copy of the moments; bit for bit the path in `_elementwise`) and
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
        params, grads, pieces, order, seeds = [], [], [], [], []
        for ci, key in enumerate(picked):
            c, pcs = carriers[key]
            params.append(c)
            seeds.append((S.sr_seed(self.seed, T, index[c], 0), S.sr_seed(self.seed, T, index[c], 1)))
            for pc in pcs:
                pieces.append((ci, pc.start or 0, pc.length))
                grads.append(pc.grad.contiguous())
                order.append(pc.pos)
        table = torch.cat([rows, zero_after.to(torch.float64)[:, None]], dim=1)
        table = table.index_select(0, upload(order, torch.int64, table.device))
        scaled = self.state_dtype != "bf16"
        books = S.int8_books(params[0].device) if self.state_dtype == "int8" else []
        done = kernels.lowprec_step(self.state_dtype, params, [mv[0] for mv in stored],
                                    [mv[1] for mv in stored] if scaled else [], [mv[2] for mv in stored],
                                    [mv[3] for mv in stored] if scaled else [], grads, pieces, table, seeds, books)
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

