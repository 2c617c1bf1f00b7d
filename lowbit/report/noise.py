"""Seed-to-seed noise of a baseline and verdicts on gaps measured against it.

At small scale the run-to-run noise of the final validation loss is as large as the effects a
recipe ladder looks for (DESIGN section 4: fp32 seed noise std 0.45 % on a 3.5 M model), so a gap
is only called a win or a loss when it is outside `k` standard deviations of the baseline's seeds;
inside it is "indistinguishable".
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

INDISTINGUISHABLE = "indistinguishable"
WORSE = "worse"
BETTER = "better"
NO_BAND = "no noise band"


@dataclass(frozen=True)
class Band:
    """mean and sample standard deviation (n - 1) of the baseline's final losses over its seeds."""
    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def rel_std(self) -> float:
        return self.std / self.mean if self.mean else math.nan


def band(values: list[float]) -> Band:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values: expected the final loss of at least one baseline seed")
    if any(not math.isfinite(v) for v in xs):
        raise ValueError(f"values: a baseline seed did not finish with a finite loss: {xs}")
    std = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return Band(statistics.fmean(xs), std, len(xs), min(xs), max(xs))


def rel_gap(value: float, b: Band) -> float:
    """(value - baseline mean) / baseline mean: +0.01 is a 1 % higher (worse) loss."""
    return (value - b.mean) / b.mean


def sigmas(value: float, b: Band) -> float:
    """How many baseline standard deviations `value` lies from the baseline mean (nan without a band)."""
    if not (b.n > 1 and b.std > 0):
        return math.nan
    return (value - b.mean) / b.std


def verdict(value: float, b: Band, k: float = 2.0) -> str:
    """"indistinguishable" within k sigma of the baseline mean, else "worse" (higher loss) or "better"."""
    if not math.isfinite(value):
        return WORSE
    s = sigmas(value, b)
    if math.isnan(s):
        return NO_BAND
    if abs(s) <= k:
        return INDISTINGUISHABLE
    return WORSE if s > 0 else BETTER
