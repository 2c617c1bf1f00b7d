"""Names of the SFT objectives of "Beyond Log Likelihood" (Li et al. 2025, arXiv:2510.00526) and how they parse.

Every objective is f(p) for the target-token probability p, applied to the tokens it keeps; "mean" divides
by the number of tokens kept, as the authors' trainer does (``sum(loss * mask) / sum(mask)`` with the
threshold folded into ``mask``; the selection is a constant for the gradient). ``sft_loss(objective=...)``
and ``fused_linear_sft_loss`` accept lowbit's names and, verbatim, the keys of the authors' code
(``trainer.objective_trans`` in github.com/GaotangLi/Beyond-Log-Likelihood):

=======================================  ======================  =========================  ==========================
paper objective                          per-token loss          tokens kept                ``objective=`` value
=======================================  ======================  =========================  ==========================
NLL, -log p                              -log p                  all                        ``nll``, ``original``,
                                                                                            ``logp``
-p                                       1 - p                   all                        ``neg_p``, ``p``
(1 - p^alpha) / alpha  (also the         (1 - p^alpha) / alpha   all                        ``GeneralFamily-<alpha>``,
paper's -p^alpha, e.g. -p^10: same                                                          ``f_alpha`` + ``alpha=``
objective up to the factor alpha)
thresholded -p, top                      1 - p                   p >= q                     ``OnlyTopP-<q>``
thresholded -p, bottom                   1 - p                   p <= q                     ``OnlyBottomP-<q>``
thresholded -log p, top                  -log p                  p >= q                     ``OnlyTopLogP-<q>``,
                                                                                            ``threshold`` + ``tau=q``
thresholded -log p, bottom               -log p                  p <= q                     ``OnlyBottomLogP-<q>``
(lowbit) -log p on a fraction, top       -log p                  the ceil(f * n) highest p  ``top_fraction`` +
                                                                                            ``fraction=f``
(lowbit) -log p on a fraction, bottom    -log p                  the ceil(f * n) lowest p   ``bottom_fraction`` +
                                                                                            ``fraction=f``
=======================================  ======================  =========================  ==========================

Ranges follow the authors' asserts: ``OnlyTop*-q`` needs 0 <= q < 1 and ``OnlyBottom*-q`` needs 0 < q <= 1
(q = 0 top and q = 1 bottom keep every token); ``alpha`` must be > 0 (alpha -> 0 is NLL, alpha = 1 is -p);
``threshold``'s ``tau`` lies in (0, 1) and defaults to 0.2. ``n`` is the number of non-ignored tokens in the
call, so the fraction variants rank tokens across the whole batch.

``top_p`` / ``bottom_p`` (lowbit's earlier names for the fraction variants) are rejected with an error that
names the replacements: in the paper "top-p" means a probability *threshold*, so silently keeping the
fraction meaning, or silently switching an existing config to a threshold, would both train something else
than the user asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

OBJECTIVES = ("nll", "neg_p", "f_alpha", "threshold", "top_fraction", "bottom_fraction")
PAPER_KEYS = ("original", "logp", "p", "GeneralFamily-<alpha>", "OnlyTopP-<q>", "OnlyBottomP-<q>",
              "OnlyTopLogP-<q>", "OnlyBottomLogP-<q>")
DEFAULT_TAU = 0.2

__all__ = ["OBJECTIVES", "PAPER_KEYS", "ObjectiveSpec", "parse_objective", "is_objective"]

# Parametrised keys of the authors' code: prefix -> (per-token loss, selection).
_THRESHOLDED = {
    "OnlyTopP": ("power", "p_ge"),
    "OnlyBottomP": ("power", "p_le"),
    "OnlyTopLogP": ("nll", "p_ge"),
    "OnlyBottomLogP": ("nll", "p_le"),
}
_RENAMED = {"top_p": "top_fraction", "bottom_p": "bottom_fraction"}


@dataclass(frozen=True)
class ObjectiveSpec:
    """A parsed objective: ``loss`` is ``"nll"`` (-log p) or ``"power"`` ((1 - p^alpha) / alpha; alpha = 1 is
    1 - p); ``keep`` is ``"all"``, ``"p_ge"`` / ``"p_le"`` (threshold ``q`` on p) or ``"top_fraction"`` /
    ``"bottom_fraction"`` (``fraction`` of the tokens)."""

    name: str
    loss: str
    alpha: Optional[float] = None
    keep: str = "all"
    q: Optional[float] = None
    fraction: Optional[float] = None

    @property
    def ranks_tokens(self) -> bool:
        """Whether the selection depends on every token of the call (not token by token)."""
        return self.keep in ("top_fraction", "bottom_fraction")


def _number(name: str, val: Any) -> Optional[float]:
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(val).__name__}")
    return float(val)


def _key_value(objective: str, prefix: str) -> float:
    text = objective[len(prefix) + 1:]
    try:
        val = float(text)
    except ValueError:
        raise ValueError(f"objective={objective!r}: expected a number after '{prefix}-', got {text!r}") from None
    if not math.isfinite(val):
        raise ValueError(f"objective={objective!r}: the number after '{prefix}-' must be finite")
    return val


def _unknown(objective: str) -> ValueError:
    return ValueError(f"unknown objective {objective!r}; known objectives: {', '.join(OBJECTIVES)}, "
                      f"and the paper's keys {', '.join(PAPER_KEYS)}")


def _parse_name(objective: str) -> ObjectiveSpec:
    """The spec of a name, before the keyword hyper-parameters are applied."""
    if objective in _RENAMED:
        kind, cmp = ("Top", ">=") if objective == "top_p" else ("Bottom", "<=")
        raise ValueError(
            f"objective={objective!r} is no longer accepted because 'p' was ambiguous. For -log p on a fraction "
            f"of the tokens (its former meaning) use objective={_RENAMED[objective]!r} with fraction=...; for the "
            f"paper's thresholded variants use 'Only{kind}LogP-<q>' (-log p where p {cmp} q) "
            f"or 'Only{kind}P-<q>' (-p where p {cmp} q)")
    if objective in ("nll", "original", "logp"):
        return ObjectiveSpec(objective, "nll")
    if objective in ("neg_p", "p"):
        return ObjectiveSpec(objective, "power", alpha=1.0)
    if objective == "f_alpha":
        return ObjectiveSpec(objective, "power")
    if objective == "threshold":
        return ObjectiveSpec(objective, "nll", keep="p_ge")
    if objective in ("top_fraction", "bottom_fraction"):
        return ObjectiveSpec(objective, "nll", keep=objective)
    prefix = objective.split("-", 1)[0]
    if "-" in objective and prefix == "GeneralFamily":
        alpha = _key_value(objective, prefix)
        if not alpha > 0:
            raise ValueError(f"objective={objective!r}: alpha must be > 0 (alpha -> 0 is NLL, 'original'), got {alpha}")
        return ObjectiveSpec(objective, "power", alpha=alpha)
    if "-" in objective and prefix in _THRESHOLDED:
        q = _key_value(objective, prefix)
        loss, keep = _THRESHOLDED[prefix]
        ok = 0.0 <= q < 1.0 if keep == "p_ge" else 0.0 < q <= 1.0
        if not ok:
            rng = "[0, 1)" if keep == "p_ge" else "(0, 1]"
            raise ValueError(f"objective={objective!r}: the threshold q must lie in {rng}, got {q}")
        return ObjectiveSpec(objective, loss, alpha=1.0 if loss == "power" else None, keep=keep, q=q)
    raise _unknown(objective)


def parse_objective(objective: Any, alpha: Any = None, tau: Any = None, fraction: Any = None) -> ObjectiveSpec:
    """Validate ``objective`` and its keyword hyper-parameters; raise naming the offending argument.

    ``alpha`` belongs to ``f_alpha``, ``tau`` to ``threshold``, ``fraction`` to ``top_fraction`` /
    ``bottom_fraction``; the paper's keys carry their number in the name and take none of them.
    """
    if not isinstance(objective, str):
        raise TypeError(f"objective must be a str, one of {', '.join(OBJECTIVES)} or a paper key; "
                        f"got {type(objective).__name__}")
    spec = _parse_name(objective)
    alpha, tau, fraction = _number("alpha", alpha), _number("tau", tau), _number("fraction", fraction)
    if alpha is not None and objective != "f_alpha":
        hint = " (GeneralFamily-<alpha> carries alpha in its name)" if objective.startswith("GeneralFamily") else ""
        raise ValueError(f"alpha is only used by objective='f_alpha', not {objective!r}{hint}")
    if tau is not None and objective != "threshold":
        raise ValueError(f"tau is only used by objective='threshold', not {objective!r}")
    if fraction is not None and not spec.ranks_tokens:
        raise ValueError(f"fraction is only used by objective='top_fraction' or 'bottom_fraction', not {objective!r}")
    if objective == "f_alpha":
        if alpha is None:
            raise ValueError("objective='f_alpha' needs alpha > 0 (alpha -> 0 is nll, alpha = 1 is neg_p)")
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        return ObjectiveSpec(objective, "power", alpha=alpha)
    if objective == "threshold":
        tau = DEFAULT_TAU if tau is None else tau
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must lie in the open interval (0, 1), got {tau}")
        return ObjectiveSpec(objective, "nll", keep="p_ge", q=tau)
    if spec.ranks_tokens:
        if fraction is None:
            raise ValueError(f"objective={objective!r} needs fraction in (0, 1], the share of tokens to train on")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        return ObjectiveSpec(objective, "nll", keep=spec.keep, fraction=fraction)
    return spec


def is_objective(name: Any) -> bool:
    """Whether ``name`` alone (no keyword hyper-parameters) is a valid objective, e.g. for a config check.

    ``f_alpha``, ``top_fraction`` and ``bottom_fraction`` count as valid names although they also need
    ``alpha`` / ``fraction``; :func:`parse_objective` reports a missing one.
    """
    if name in ("f_alpha", "top_fraction", "bottom_fraction"):
        return True
    try:
        parse_objective(name)
    except (TypeError, ValueError):
        return False
    return True
