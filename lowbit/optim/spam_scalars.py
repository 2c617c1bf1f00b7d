"""Stable-SPAM's per-tensor scalar recurrences (the AdaClip threshold, the AdaGN moments, Adam's
bias corrections and resets) for all tensors of a step at once, as fp64 tensors on the gradients'
device: a step reads nothing back to the host, so on a GPU it never waits for one.

One row of state per tensor, columns `COLS`. Every update is masked by ``live`` (the tensor's
gradient is finite): a skipped tensor keeps its row. Each result is a sequence of IEEE fp64
additions, multiplications, divisions and square roots, so it has the same bits on every device.
The default (clean) mode keeps the powers ``theta^k``, ``gamma2^k``, ``beta2^j`` as running
products; ``compat="official"`` raises the factors to the power k as the authors' code does
(``torch.pow``, whose last bit may differ between a CPU and a GPU).
"""
from __future__ import annotations

import torch

from ..backends.ref.optim import SCALARS

COLS = ("k", "clip_max", "norm_mean", "norm_sq_mean", "theta_prod", "gamma2_prod", "gamma1_prod", "beta1_prod",
        "beta2_prod", "reset_epoch")
_C = {name: i for i, name in enumerate(COLS)}
_ONES = ("theta_prod", "gamma2_prod", "gamma1_prod", "beta1_prod", "beta2_prod")


def initial(epoch: int, device) -> torch.Tensor:
    """The state row of a tensor first seen in reset interval `epoch`."""
    row = torch.zeros(len(COLS), dtype=torch.float64, device=device)
    for name in _ONES:
        row[_C[name]] = 1.0
    row[_C["reset_epoch"]] = float(epoch)
    return row


# the statistics as earlier versions saved them, Python floats in the tensor's state dict
_FLOAT_KEYS = ("step", "clip_max", "norm_mean", "norm_sq_mean", "reset_epoch", "moment_step", "gamma1_prod",
               "beta1_prod")


def pop_floats(st: dict, theta: float, gamma2: float, beta2: float) -> list[float]:
    """The row of a state saved as Python floats by earlier versions (keys "step", "clip_max", ...),
    which are removed from `st`."""
    k = st["step"]
    j = st.get("moment_step", k)
    row = [float(k), st["clip_max"], st["norm_mean"], st["norm_sq_mean"], theta ** k, gamma2 ** k,
           st.get("gamma1_prod", 1.0), st.get("beta1_prod", 1.0), beta2 ** j, float(st.get("reset_epoch", 0))]
    for key in _FLOAT_KEYS:
        st.pop(key, None)
    return row


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest fp32 value, kept in fp64."""
    return x.float().double()


class Step:
    """The scalars of one step for n tensors. ``state`` [n, len(COLS)] is read, never written:
    `new_state` is the state after the step. ``fp32`` rounds every scalar of the elementwise step
    to fp32 (tensors that compute in fp32)."""

    def __init__(self, state: torch.Tensor, amax: torch.Tensor, official: bool, fp32: bool):
        self.old, self.new, self.official = state, state.clone(), official
        self.rnd = _f32 if fp32 else (lambda x: x)
        self.amax = amax
        self.live = torch.isfinite(amax)

    def _set(self, name: str, value: torch.Tensor) -> None:
        self.new[:, _C[name]] = value

    def _get(self, name: str) -> torch.Tensor:
        return self.new[:, _C[name]]

    def _pow(self, factor: float, name: str) -> torch.Tensor:
        """factor^k (official: torch.pow), else the running product in column `name` times factor."""
        if self.official:
            return torch.pow(factor, self._get("k"))
        self._set(name, self._get(name) * factor)
        return self._get(name)

    def clip(self, theta: float) -> torch.Tensor:
        """Advance k and the AdaClip maximum M; -> the [n, 3] (clip, mh, r) table of `clip_stats`:
        clip where max |g| exceeds the bias-corrected threshold M^, which it is rescaled to."""
        self._set("k", self._get("k") + 1.0)
        self._set("clip_max", self._get("clip_max") * theta + self.amax * (1.0 - theta))
        mhat = self._get("clip_max") / (1.0 - self._pow(theta, "theta_prod"))
        self.clipping = self.live & (self.amax > mhat)
        ratio = torch.where(self.clipping, mhat / self.amax, 1.0)
        self.mh, self.r = self.rnd(mhat), self.rnd(ratio)
        return torch.stack([self.clipping.double(), self.mh, self.r], dim=1)

    def norm_factor(self, sumsq: torch.Tensor, g1: float, g2: float, eps: float) -> torch.Tensor:
        """Advance mu, nu on ||g|| = sqrt(sumsq) (of the clipped gradient); -> the AdaGN multiplier
        mu^ / (sqrt(nu^) + eps) / ||g|| (1 where ||g|| = 0)."""
        norm = torch.sqrt(sumsq)
        self._set("norm_mean", self._get("norm_mean") * g1 + norm * (1.0 - g1))
        self._set("norm_sq_mean", self._get("norm_sq_mean") * g2 + norm * (1.0 - g2) * norm)
        mu_hat = self._get("norm_mean") / (1.0 - self._pow(g1, "gamma1_prod"))
        nu_hat = self._get("norm_sq_mean") / (1.0 - self._pow(g2, "gamma2_prod"))
        c = mu_hat / (torch.sqrt(nu_hat) + eps)
        return torch.where(norm > 0, c / norm, 1.0)

    def adam(self, beta1: float, beta2: float, epoch: int, reset: bool):
        """-> (bc1, bc2, zero the moments before the update, zero them after). Clean: a tensor
        entering a new reset interval `epoch` (now, or at its next step when it had no gradient at
        the reset) restarts its bias corrections on zeroed moments. Official: at a reset step
        (`reset`) k restarts at 1 and the moments are zeroed only after the update."""
        if self.official:
            if reset:
                self._set("k", torch.ones_like(self._get("k")))
            k = self._get("k")
            none = torch.zeros_like(self.live)
            return 1.0 - torch.pow(beta1, k), 1.0 - torch.pow(beta2, k), none, self.live & reset
        fresh = self._get("reset_epoch") != float(epoch)
        self._set("reset_epoch", torch.full_like(self._get("reset_epoch"), float(epoch)))
        for name in ("beta1_prod", "beta2_prod"):
            self._set(name, torch.where(fresh, 1.0, self._get(name)))
        bc1 = 1.0 - self._pow(beta1, "beta1_prod")
        bc2 = 1.0 - self._pow(beta2, "beta2_prod")
        return bc1, bc2, fresh, torch.zeros_like(fresh)

    def rows(self, f, bc1, bc2, zero_before, consts: dict, clip_in_step: bool) -> torch.Tensor:
        """The [n, len(SCALARS)] table of the elementwise step (`lowbit.optim.kernels.SCALARS`)."""
        rnd = self.rnd
        n = self.amax.shape[0]
        cols = {"clip": (self.clipping if clip_in_step else torch.zeros_like(self.clipping)).double(),
                "mh": self.mh, "r": self.r, "f": rnd(f), "inv_sbc2": rnd(1.0 / torch.sqrt(bc2)),
                "step": rnd(consts["lr"] / bc1), "zero": (zero_before & self.live).double(),
                "skip": (~self.live).double()}
        out = torch.empty((n, len(SCALARS)), dtype=torch.float64, device=self.amax.device)
        for j, name in enumerate(SCALARS):
            if name in cols:
                out[:, j] = cols[name]
            else:
                out[:, j] = consts[name]
        return out

    def new_state(self) -> torch.Tensor:
        """The state after this step: the old row where the gradient was not finite."""
        return torch.where(self.live[:, None], self.new, self.old)
