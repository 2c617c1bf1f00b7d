"""Probability-based SFT objectives ("Beyond Log Likelihood", Li et al. 2025, arXiv:2510.00526).

Every objective is a per-token function of the target-token probability p = softmax(z)[y], taken from an
fp32 log-softmax, applied to the tokens that the objective keeps. The objectives, their names (lowbit's
and the authors' keys, accepted verbatim) and the paper name of each are tabled in
:mod:`lowbit.objectives.family`; :func:`lowbit.objectives.auto_objective` picks one from the base model's prior.

Reduction ``"mean"`` divides the summed loss by the number of tokens the objective keeps, as the authors'
trainer does; thresholds and fractions select tokens without contributing a gradient of their own.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

from .family import OBJECTIVES, ObjectiveSpec, _parse_name, parse_objective

REDUCTIONS = ("mean", "sum", "none")

__all__ = ["OBJECTIVES", "sft_loss"]


def _check_objective(objective: Any, alpha: Any, tau: Any, fraction: Any, p: Any = None) -> ObjectiveSpec:
    """:func:`parse_objective`, plus ``p``: the name ``fraction`` had before the fraction objectives were renamed."""
    if p is not None:
        if fraction is not None:
            raise ValueError("give fraction or p (its former name), not both")
        if objective not in ("top_fraction", "bottom_fraction"):
            if isinstance(objective, str):
                _parse_name(objective)  # a renamed or unknown name is the error to report first
            raise ValueError(f"p is only accepted as the former name of fraction (objective='top_fraction' or "
                             f"'bottom_fraction'), not with objective={objective!r}")
        fraction = p
    return parse_objective(objective, alpha, tau, fraction)


def _check_reduction(reduction: Any) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _check_labels(labels: Any, expect_shape: torch.Size, vocab: int, ignore_index: int, what: str) -> torch.Tensor:
    """Shape, dtype and range checks shared by the unfused and fused paths."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != expect_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {what} {tuple(expect_shape)}")
    valid = labels != ignore_index
    # the range is read on the host only where that is free: on a GPU it would wait for the device
    # (a sync in every training step); there an out-of-range label fails in the gather instead
    if labels.device.type == "cpu" and labels.numel():
        outside = ((labels < 0) | (labels >= vocab)).logical_and(valid)
        if bool(outside.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {labels[outside][:4].tolist()}")
    return valid


def _log_q(q: float) -> float:
    return float("-inf") if q == 0.0 else math.log(q)


def _keep_mask(logp: torch.Tensor, valid: torch.Tensor, spec: ObjectiveSpec) -> torch.Tensor:
    """Tokens that the objective trains on, given fp32 target log-probs ``logp`` (any shape)."""
    # Thresholds compare in log space so the fused and unfused paths, which both hold log p, agree exactly.
    if spec.keep == "p_ge":
        return valid & (logp >= _log_q(spec.q))
    if spec.keep == "p_le":
        return valid & (logp <= _log_q(spec.q))
    if spec.ranks_tokens:
        # k = min(n, max(1, ceil(fraction n))) of the n valid tokens, ranked by log p, all on the
        # device: a top-k with a host k would read n back (a sync on a GPU)
        flat_valid = valid.reshape(-1)
        n = flat_valid.sum()
        k = torch.ceil(spec.fraction * n.double() - 1e-9).clamp(min=1).minimum(n.double())
        top = spec.keep == "top_fraction"
        fill = float("-inf") if top else float("inf")
        scores = logp.detach().reshape(-1).masked_fill(~flat_valid, fill)
        order = torch.sort(scores, descending=top, stable=True).indices
        ranked = torch.arange(order.numel(), device=order.device) < k
        keep = torch.zeros_like(flat_valid).scatter_(0, order, ranked)
        return (keep & flat_valid).view_as(valid)
    return valid


class _PowerLoss(torch.autograd.Function):
    """(1 - p^alpha) / alpha as a function of log p.

    The value uses expm1 (accurate as alpha -> 0); the gradient is -p^alpha computed by exp directly,
    because autograd's expm1 backward forms it as expm1 + 1 and cancels to 0 for small p in fp32.
    """

    @staticmethod
    def forward(ctx, logp, alpha):
        ctx.save_for_backward(logp)
        ctx.alpha = alpha
        return -torch.expm1(alpha * logp) / alpha

    @staticmethod
    def backward(ctx, grad):
        (logp,) = ctx.saved_tensors
        return -torch.exp(ctx.alpha * logp) * grad, None


def _token_loss(logp: torch.Tensor, spec: ObjectiveSpec) -> torch.Tensor:
    """Per-token loss f(log p), differentiable in ``logp``."""
    if spec.loss == "power":
        return _PowerLoss.apply(logp, spec.alpha)
    return -logp


def _token_dloss(logp: torch.Tensor, spec: ObjectiveSpec) -> torch.Tensor:
    """d f / d log p, the closed form used by the fused path."""
    if spec.loss == "power":
        return -torch.exp(spec.alpha * logp)
    return torch.full_like(logp, -1.0)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 for the log-softmax; fp64 stays fp64 (reference / gradcheck use)."""
    return x if x.dtype == torch.float64 else x.float()


def _warn_all_masked() -> None:
    warnings.warn("sft_loss: no token is kept (all labels are ignore_index, or the objective's selection "
                  "is empty); returning a zero loss", RuntimeWarning, stacklevel=3)


def _reduce(per_token: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    n = keep.sum()  # a device tensor: reading it would wait for the device
    if keep.device.type == "cpu" and n == 0:
        _warn_all_masked()
    # nothing kept: every term is 0, so is the loss, and backward() yields zero gradients
    total = per_token.sum(dtype=torch.float64).to(per_token.dtype)
    return total / n.clamp(min=1) if reduction == "mean" else total


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, *, objective: str = "nll", alpha: Optional[float] = None,
             tau: Optional[float] = None, fraction: Optional[float] = None, ignore_index: int = -100,
             reduction: str = "mean", p: Optional[float] = None) -> torch.Tensor:
    """SFT loss of ``logits`` (..., V) against ``labels`` (...) under one objective.

    ``objective``: one of :data:`OBJECTIVES` or a key of the authors' code (``"original"``, ``"p"``,
    ``"GeneralFamily-8"``, ``"OnlyTopP-0.1"``, ...; see :mod:`lowbit.objectives.family`). ``alpha``
    (``f_alpha``), ``tau`` (``threshold``) and ``fraction`` (``top_fraction`` / ``bottom_fraction``; ``p``
    is its former name) are the hyper-parameters of lowbit's names.

    ``labels`` are aligned with ``logits`` (already shifted, as for ``F.cross_entropy``); prompt and
    padding positions carry ``ignore_index``. Log-probabilities are computed in fp32 whatever the
    dtype of ``logits``. ``reduction="mean"`` averages over the tokens the objective keeps, ``"sum"``
    sums them, ``"none"`` returns the per-token loss (0 where not kept) with the shape of ``labels``.
    When nothing is kept the loss is 0 (with a ``RuntimeWarning`` for CPU tensors), never NaN. The
    result is fp32 (fp64 for fp64 logits). Nothing is read back from a GPU (no sync): the range of
    the labels is checked on CPU tensors; on a GPU a label outside [0, V) fails in the gather.
    """
    spec = _check_objective(objective, alpha, tau, fraction, p)
    _check_reduction(reduction)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    valid = _check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, "logits.shape[:-1]")
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp_all = torch.log_softmax(_acc(logits), dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    keep = _keep_mask(logp, valid, spec)
    return _reduce(_token_loss(logp, spec), keep, reduction)
