"""What StableSPAM, SPAM and CLASSP share: argument checks, the step loop and the counters of
``optimizer.stats`` (counts made on a device are read only when the counters are)."""
from __future__ import annotations

import math
import numbers

import torch
from torch.optim import Optimizer

from .state import ExactStateLoad


# ---- argument checks ---------------------------------------------------------------------------
def check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def check_unit(value, name: str) -> float:
    """A decay factor in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def check_fraction(value, name: str) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
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


def check_count(value, name: str) -> int:
    """A number of steps that may be 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


def check_adam(lr, betas, eps, weight_decay) -> dict:
    """Adam's hyper-parameters, checked, as the start of an optimizer's defaults."""
    return dict(lr=check_nonneg(lr, "lr"), betas=check_betas(betas), eps=check_nonneg(eps, "eps"),
                weight_decay=check_nonneg(weight_decay, "weight_decay"))


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


# ---- the optimizers' common frame ---------------------------------------------------------------
class LowbitOptimizer(ExactStateLoad, Optimizer):
    """Checks the parameters, keeps ``stats`` and runs `step` as one `_step_group` call per
    parameter group; a subclass implements `_step_group`."""

    # True where the update of each element depends on that element alone, so that stepping on
    # DeepSpeed's ZeRO flat partitions needs no layout (see `lowbit.optim.zero.attach`)
    elementwise_update = False

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        check_params(self)
        self.stats = new_stats()

    @property
    def stats(self) -> dict:
        """Counters of the steps taken (Python ints). Counts a step makes on a device (`_count`) are
        added here when read, so reading them is the only time they wait for the device."""
        pending = self.__dict__.get("_pending")
        if pending:
            for (key, _), n in pending.items():
                self._stats[key] = self._stats.get(key, 0) + int(n.item())
            pending.clear()
        return self._stats

    @stats.setter
    def stats(self, value: dict) -> None:
        self._stats = value
        self._pending = {}

    def _count(self, key: str, n: torch.Tensor) -> None:
        """Add `n` (an integer 0-d tensor, on any device) to ``stats[key]`` without reading it."""
        slot, n = (key, n.device), n.to(torch.int64)
        self._pending[slot] = self._pending[slot] + n if slot in self._pending else n

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        # remembered so that a tensor this optimizer was never given (a DeepSpeed ZeRO flat
        # partition) can be told apart: it keeps its own clock (`_clock`), and an optimizer with
        # per-tensor statistics refuses it without a layout; set up here because
        # Optimizer.__init__ adds the first groups before the subclass's __init__ can
        given = self.__dict__.setdefault("_given", set())
        given.update(id(p) for p in self.param_groups[-1]["params"])

    def _partitions(self, params) -> list:
        """The tensors of `params` this optimizer was not constructed with (ZeRO flat partitions)."""
        given = self.__dict__.get("_given", ())
        return [p for p in params if id(p) not in given]

    def _clock(self, group: dict, partitions=()) -> int:
        """Advance the global step of `group` by one training step; -> the step T.

        DeepSpeed steps its flat ZeRO partitions one ``step()`` call per parameter group (ZeRO
        1/2) or per sub group (ZeRO 3, several per group when ``sub_group_size`` splits it), so
        a clock per call would run several times faster than training and bring resets,
        warm-ups and schedules early. A partition therefore counts its own steps in its state;
        a partition seen for the first time starts from the group's count when the group's
        first partition appeared (all of them are first stepped in the same training step),
        so the later sub groups of that step do not start one ahead."""
        if not partitions:
            group["global_step"] += 1
            return group["global_step"]
        base = group.setdefault("partition_base", group["global_step"])
        T = self.state[partitions[0]].get("global_step", base) + 1
        for p in partitions:
            self.state[p]["global_step"] = T
        group["global_step"] = T
        return T

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # a tensor's position among all parameters: its stochastic-rounding seeds derive from it
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            # DeepSpeed empties the groups it is not stepping in this call: they keep their clock
            if group["params"]:
                self._step_group(group, index)
        self._stats["steps"] += 1  # not `stats`: reading it waits for the device
        return loss

    def _step_group(self, group: dict, index: dict) -> None:
        raise NotImplementedError
