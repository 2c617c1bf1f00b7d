"""Probability-based SFT objectives ("Beyond Log Likelihood", Li et al. 2025).

Every objective is a function of the target-token probability p = softmax(z)[y], taken from an fp32
log-softmax, applied to the tokens that the objective keeps:

=============  =============================  ===============================================
objective      per-token loss                 tokens kept (besides ``labels != ignore_index``)
=============  =============================  ===============================================
``nll``        -log p                         all
``neg_p``      1 - p   (the paper's -p)       all
``f_alpha``    (1 - p^alpha) / alpha          all    (alpha -> 0: -log p; alpha = 1: 1 - p)
``threshold``  -log p                         p >= tau            (tau defaults to 0.2)
``top_p``      -log p                         the ceil(p * n) tokens of highest p
``bottom_p``   -log p                         the ceil(p * n) tokens of lowest p
=============  =============================  ===============================================

Reduction ``"mean"`` divides the summed loss by the number of tokens the objective keeps, which is
what the authors' trainer does (``sum(loss * mask) / sum(mask)`` with the threshold folded into
``mask``). ``n`` above is the number of non-ignored tokens in the call, so ``top_p`` / ``bottom_p``
rank tokens across the whole batch. The masks of ``threshold`` / ``top_p`` / ``bottom_p`` are
treated as constants by the gradient, as in the authors' code.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

OBJECTIVES = ("nll", "neg_p", "f_alpha", "threshold", "top_p", "bottom_p")
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_TAU = 0.2

__all__ = ["OBJECTIVES", "sft_loss", "prior_strength", "PriorStrength"]


@dataclass(frozen=True)
class _Spec:
    objective: str
    alpha: Optional[float]
    tau: Optional[float]
    p: Optional[float]


def _check_objective(objective: Any, alpha: Any, tau: Any, p: Any) -> _Spec:
    """Validate the objective and its hyper-parameters; raise naming the offending argument."""
    if not isinstance(objective, str):
        raise TypeError(f"objective must be a str, one of {', '.join(OBJECTIVES)}; got {type(objective).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known objectives: {', '.join(OBJECTIVES)}")
    for name, val in (("alpha", alpha), ("tau", tau), ("p", p)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
            raise TypeError(f"{name} must be a number, got {type(val).__name__}")
    if alpha is not None and objective != "f_alpha":
        raise ValueError(f"alpha is only used by objective='f_alpha', not {objective!r}")
    if tau is not None and objective != "threshold":
        raise ValueError(f"tau is only used by objective='threshold', not {objective!r}")
    if p is not None and objective not in ("top_p", "bottom_p"):
        raise ValueError(f"p is only used by objective='top_p' or 'bottom_p', not {objective!r}")
    if objective == "f_alpha":
        if alpha is None:
            raise ValueError("objective='f_alpha' needs alpha > 0 (alpha -> 0 is nll, alpha = 1 is neg_p)")
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        alpha = float(alpha)
    if objective == "threshold":
        tau = DEFAULT_TAU if tau is None else float(tau)
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must lie in the open interval (0, 1), got {tau}")
    if objective in ("top_p", "bottom_p"):
        if p is None:
            raise ValueError(f"objective={objective!r} needs p in (0, 1], the fraction of tokens to train on")
        p = float(p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must lie in (0, 1], got {p}")
    return _Spec(objective, alpha, tau, p)


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
    if labels.numel() and bool(((labels < 0) | (labels >= vocab)).logical_and(valid).any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab))]
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {bad[:4].tolist()}")
    return valid


def _keep_mask(logp: torch.Tensor, valid: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Tokens that the objective trains on, given fp32 target log-probs ``logp`` (any shape)."""
    if spec.objective == "threshold":
        # Compare in log space so the fused and unfused paths agree exactly at the boundary.
        return valid & (logp >= math.log(spec.tau))
    if spec.objective in ("top_p", "bottom_p"):
        flat_valid = valid.reshape(-1)
        n = int(flat_valid.sum())
        keep = torch.zeros_like(flat_valid)
        if n == 0:
            return keep.view_as(valid)
        k = min(n, max(1, math.ceil(spec.p * n - 1e-9)))
        top = spec.objective == "top_p"
        fill = float("-inf") if top else float("inf")
        scores = logp.detach().reshape(-1).masked_fill(~flat_valid, fill)
        idx = torch.topk(scores, k, largest=top, sorted=False).indices
        keep[idx] = True
        return keep.view_as(valid)
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


def _token_loss(logp: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Per-token loss f(log p), differentiable in ``logp``."""
    if spec.objective == "neg_p":
        return _PowerLoss.apply(logp, 1.0)
    if spec.objective == "f_alpha":
        return _PowerLoss.apply(logp, spec.alpha)
    return -logp


def _token_dloss(logp: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """d f / d log p, the closed form used by the fused path."""
    if spec.objective == "neg_p":
        return -torch.exp(logp)
    if spec.objective == "f_alpha":
        return -torch.exp(spec.alpha * logp)
    return torch.full_like(logp, -1.0)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 for the log-softmax; fp64 stays fp64 (reference / gradcheck use)."""
    return x if x.dtype == torch.float64 else x.float()


def _warn_all_masked() -> None:
    warnings.warn("sft_loss: no token is kept (all labels are ignore_index, or the objective's selection "
                  "is empty); returning a zero loss", RuntimeWarning, stacklevel=3)


def _reduce(per_token: torch.Tensor, keep: torch.Tensor, reduction: str, anchor: torch.Tensor) -> torch.Tensor:
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    n = int(keep.sum())
    if n == 0:
        _warn_all_masked()
        # Keep the graph connected so backward() still works and yields zero gradients.
        return anchor.sum() * 0.0
    total = per_token.sum(dtype=torch.float64).to(per_token.dtype)
    return total / n if reduction == "mean" else total


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, *, objective: str = "nll", alpha: Optional[float] = None,
             tau: Optional[float] = None, p: Optional[float] = None, ignore_index: int = -100,
             reduction: str = "mean") -> torch.Tensor:
    """SFT loss of ``logits`` (..., V) against ``labels`` (...) under one of :data:`OBJECTIVES`.

    ``labels`` are aligned with ``logits`` (already shifted, as for ``F.cross_entropy``); prompt and
    padding positions carry ``ignore_index``. Log-probabilities are computed in fp32 whatever the
    dtype of ``logits``. ``reduction="mean"`` averages over the tokens the objective keeps (see the
    module docstring), ``"sum"`` sums them, ``"none"`` returns the per-token loss (0 where not kept)
    with the shape of ``labels``. When nothing is kept the loss is 0 (with a ``RuntimeWarning``),
    never NaN. The result is fp32 (fp64 for fp64 logits).
    """
    spec = _check_objective(objective, alpha, tau, p)
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
    return _reduce(_token_loss(logp, spec), keep, reduction, logp)


@dataclass(frozen=True)
class PriorStrength:
    """Result of :func:`prior_strength`."""

    mean_prob: float
    num_tokens: int
    regime: str
    recommended_objective: str
    explanation: str

    def __str__(self) -> str:
        return (f"mean target probability {self.mean_prob:.4f} over {self.num_tokens} tokens -> {self.regime} prior; "
                f"recommended objective: {self.recommended_objective} ({self.explanation})")


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor, dict]:
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError("prior_strength: a dict batch needs a 'labels' entry")
        labels = batch["labels"]
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return None, labels, kwargs
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], {}
    raise TypeError("prior_strength: batches must be dicts with 'input_ids' and 'labels' or (input_ids, labels) pairs")


@torch.no_grad()
def prior_strength(model: torch.nn.Module, dataloader: Iterable, *, ignore_index: int = -100,
                   max_batches: Optional[int] = None, strong: float = 0.5, weak: float = 0.2,
                   shift: bool = True) -> PriorStrength:
    """Mean predicted probability of the training targets under the (base) ``model``.

    Batches are dicts (``labels`` plus the model's keyword inputs, e.g. ``input_ids``) or
    ``(input_ids, labels)`` pairs; the model returns logits or an object with ``.logits``. With
    ``shift=True`` (Hugging Face convention) position t predicts ``labels[t + 1]``.

    The recommendation follows the paper's model-capability continuum: a strong prior (the model
    already assigns high probability to the targets) favours prior-leaning objectives such as
    ``neg_p``; a weak prior favours ``nll``; in between no objective dominates and ``nll`` is kept as
    the safe default. The paper locates tasks on the continuum qualitatively; the cut-points
    ``strong`` / ``weak`` on the mean probability are lowbit's defaults, exposed so users can set their own.
    """
    if not 0.0 <= weak <= strong <= 1.0:
        raise ValueError(f"need 0 <= weak <= strong <= 1, got weak={weak}, strong={strong}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            inputs, labels, kwargs = _split_batch(batch)
            out = model(inputs, **kwargs) if inputs is not None else model(**kwargs)
            logits = getattr(out, "logits", out)
            if shift:
                logits, labels = logits[..., :-1, :], labels[..., 1:]
            labels = labels.to(logits.device)
            valid = _check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, "logits.shape[:-1]")
            safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
            logp = torch.log_softmax(_acc(logits), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            total += float(logp.exp()[valid].sum(dtype=torch.float64))
            count += int(valid.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("prior_strength: the dataloader produced no target tokens (all labels ignored)")
    mean = total / count
    if mean >= strong:
        regime, obj, why = "strong", "neg_p", "prior-leaning objectives beat NLL near the model-strong end"
    elif mean <= weak:
        regime, obj, why = "weak", "nll", "NLL dominates near the model-weak end"
    else:
        regime, obj, why = "intermediate", "nll", "no objective dominates in between; NLL is the safe default, try neg_p too"
    return PriorStrength(mean, count, regime, obj, why)
