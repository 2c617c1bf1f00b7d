"""Alignment objectives on sequence log-probabilities: DPO with f-divergences (f-DPO) and KLDO.

* f-DPO (Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
  Divergence Constraints"): with u = pi(y|x) / pi_ref(y|x) and f the divergence's generator, the
  implicit reward is beta * f'(u), and the loss is the Bradley-Terry log-loss of the reward gap,
  -log sigmoid(beta * (f'(u_w) - f'(u_l))). Reverse KL (f'(u) = log u + 1) is standard DPO.
* KLDO (Haldar et al., "LLM Safety Alignment is Divergence Estimation in Disguise"): the
  Donsker-Varadhan estimator of KL(aligned || unaligned) with the critic r = beta * log(pi / pi_ref):
  L = -E_{D+}[r] + log E_{D-}[exp r], minimised, so -L estimates the divergence. Aligned (D+) and
  unaligned (D-) responses need not be paired (compliance vs refusal data).
* KTO (Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", eqn 7) and BCO (Jung
  et al., "Binary Classifier Optimization for Large Language Model Alignment") on the same unpaired
  aligned / unaligned batches, computed as TRL's ``KTOTrainer`` / ``BCOTrainer`` do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .sft import _acc, _check_labels

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")

__all__ = ["DIVERGENCES", "sequence_logps", "dpo_loss", "kldo_loss", "KLDORunningMean", "kto_loss",
           "kto_kl_completions", "bco_loss", "BCORunningMean"]

# exp() arguments are capped here so an extreme policy/reference ratio cannot overflow fp32.
_EXP_CAP = 50.0


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed fp32 log p(labels) per sequence: ``logits`` (B, T, V), ``labels`` (B, T) aligned (already
    shifted) with ``ignore_index`` on prompt / padding positions; returns shape (B,)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., T, V), got shape {tuple(logits.shape)}")
    valid = _check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, "logits.shape[:-1]")
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(_acc(logits), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)).sum(-1)


def _check_logps(**named: torch.Tensor) -> torch.Size:
    shape = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match {first} shape {tuple(shape)}")
    return shape


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    return float(beta)


def _f_prime(logratio: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """f'(u) - f'(1) for u = exp(logratio); the constant shift cancels in every reward gap."""
    if divergence == "reverse_kl":
        return logratio
    if divergence == "js":
        # f(u) = u log u - (u + 1) log((u + 1) / 2) gives f'(u) = log(2u / (1 + u)).
        return logratio + math.log(2.0) - F.softplus(logratio)
    a = 1.0 if divergence == "forward_kl" else alpha
    # alpha-divergence f'(u) = (1 - u^-a) / a; forward KL (f = -log u) is a = 1.
    return -torch.expm1((-a * logratio).clamp(max=_EXP_CAP)) / a


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             divergence: str = "reverse_kl", alpha: Optional[float] = None, label_smoothing: float = 0.0,
             reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """f-DPO loss on per-sequence log-probs (e.g. from :func:`sequence_logps`); returns ``(loss, metrics)``.

    ``divergence``: ``reverse_kl`` (standard DPO), ``forward_kl``, ``js`` or ``alpha`` (needs ``alpha``
    in (0, 1]; alpha = 1 is forward KL). ``label_smoothing`` eps in [0, 0.5] is conservative DPO:
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    ``metrics`` (detached): ``chosen_rewards`` / ``rejected_rewards`` per pair (beta * f'(u), shifted so
    that a policy equal to the reference scores 0; for reverse KL this is beta * log(pi / pi_ref)),
    their means ``chosen_reward`` / ``rejected_reward``, ``margin`` (mean reward gap) and ``accuracy``
    (fraction of pairs whose chosen reward is higher).
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = _check_beta(beta)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; known divergences: {', '.join(DIVERGENCES)}")
    if divergence == "alpha":
        if alpha is None:
            raise ValueError("divergence='alpha' needs alpha in (0, 1]")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    elif alpha is not None:
        raise ValueError(f"alpha is only used by divergence='alpha', not {divergence!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of mean, sum, none, got {reduction!r}")

    chosen = beta * _f_prime(_acc(policy_chosen_logps) - _acc(ref_chosen_logps), divergence, alpha)
    rejected = beta * _f_prime(_acc(policy_rejected_logps) - _acc(ref_rejected_logps), divergence, alpha)
    gap = chosen - rejected
    losses = -(1.0 - label_smoothing) * F.logsigmoid(gap) - label_smoothing * F.logsigmoid(-gap)
    loss = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses
    c, r = chosen.detach(), rejected.detach()
    metrics = {
        "chosen_rewards": c, "rejected_rewards": r,
        "chosen_reward": c.mean(), "rejected_reward": r.mean(),
        "margin": (c - r).mean(), "accuracy": (c > r).float().mean(),
    }
    return loss, metrics


class KLDORunningMean:
    """Moving average of E_{D-}[exp r] for KLDO's bias-corrected gradient (the authors' ``ma`` mode).

    The gradient of log E[exp r] over a mini-batch is exp(r_j) / (n * E[exp r]); estimating the
    denominator from one small batch biases it (as in MINE), so it is replaced by an exponential moving
    average over batches, updated with weight ``rate`` and kept in log space.
    """

    def __init__(self, rate: float = 0.1):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must lie in (0, 1], got {rate}")
        self.rate = float(rate)
        self.log_value: Optional[torch.Tensor] = None

    def update(self, batch_log_mean_exp: torch.Tensor) -> torch.Tensor:
        x = batch_log_mean_exp.detach()
        if self.log_value is None or self.rate == 1.0:
            self.log_value = x
        else:
            self.log_value = torch.logaddexp(self.log_value + math.log1p(-self.rate), x + math.log(self.rate))
        return self.log_value

    def reset(self) -> None:
        self.log_value = None


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, 0) - math.log(x.shape[0])


def kldo_loss(policy_aligned_logps: torch.Tensor, policy_unaligned_logps: torch.Tensor,
              ref_aligned_logps: torch.Tensor, ref_unaligned_logps: torch.Tensor, *, beta: float = 0.1,
              running_mean: Optional[KLDORunningMean] = None) -> tuple[torch.Tensor, dict]:
    """KLDO loss ``-mean(r+) + log mean(exp r-)`` with r = beta * (policy - ref) log-probs; ``(loss, metrics)``.

    Aligned (compliance / preferred) and unaligned (refusal-worthy / rejected) batches are 1-D and may
    differ in size. The loss value is always the plain mini-batch Donsker-Varadhan estimate; with a
    :class:`KLDORunningMean` the gradient of the log-mean-exp term uses its moving-average denominator
    (the authors' default ``ma`` estimator) and the average is updated. An empty side contributes 0.

    ``metrics`` (detached): ``aligned_reward`` / ``unaligned_reward`` (mean r), ``margin`` (their
    difference), ``accuracy`` (fraction of (aligned, unaligned) pairs with r+ > r-), ``kl_estimate``
    (-loss, the DV lower bound on KL(aligned || unaligned) in the critic's units).
    """
    _check_side_logps(policy_aligned_logps, policy_unaligned_logps, ref_aligned_logps, ref_unaligned_logps)
    beta = _check_beta(beta)
    if running_mean is not None and not isinstance(running_mean, KLDORunningMean):
        raise TypeError(f"running_mean must be a KLDORunningMean or None, got {type(running_mean).__name__}")

    r_pos = beta * (_acc(policy_aligned_logps) - _acc(ref_aligned_logps))
    r_neg = beta * (_acc(policy_unaligned_logps) - _acc(ref_unaligned_logps))
    zero = (r_pos.sum() + r_neg.sum()) * 0.0
    aligned_term = r_pos.mean() if r_pos.numel() else zero
    if r_neg.numel() == 0:
        unaligned_term = zero
    else:
        lme = _log_mean_exp(r_neg)
        if running_mean is None:
            unaligned_term = lme
        else:
            log_avg = running_mean.update(lme)
            # Value: the batch estimate; gradient: exp(r_j) / (n * moving average).
            w = torch.exp(r_neg - log_avg).mean()
            unaligned_term = lme.detach() + (w - w.detach())
    loss = unaligned_term - aligned_term

    p, n = r_pos.detach(), r_neg.detach()
    nan = torch.tensor(float("nan"))
    metrics = {
        "aligned_reward": p.mean() if p.numel() else nan,
        "unaligned_reward": n.mean() if n.numel() else nan,
        "kl_estimate": -loss.detach(),
    }
    metrics["margin"] = metrics["aligned_reward"] - metrics["unaligned_reward"]
    if p.numel() and n.numel():
        # Fraction of (aligned, unaligned) pairs ordered correctly, by sorting rather than all pairs.
        below = torch.searchsorted(torch.sort(n).values, p.contiguous(), side="left")
        metrics["accuracy"] = below.sum().to(p.dtype) / (p.numel() * n.numel())
    else:
        metrics["accuracy"] = nan
    return loss, metrics


def _check_side_logps(policy_aligned_logps, policy_unaligned_logps, ref_aligned_logps, ref_unaligned_logps) -> None:
    """The unpaired losses' inputs: 1-D per-sequence log-probs, policy and reference alike per side."""
    _check_logps(policy_aligned_logps=policy_aligned_logps, ref_aligned_logps=ref_aligned_logps)
    _check_logps(policy_unaligned_logps=policy_unaligned_logps, ref_unaligned_logps=ref_unaligned_logps)
    for name, t in (("policy_aligned_logps", policy_aligned_logps), ("policy_unaligned_logps", policy_unaligned_logps)):
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one log-prob per sequence), got shape {tuple(t.shape)}")


def _check_weight(name: str, val) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(val).__name__}")
    if not (val >= 0 and math.isfinite(val)):
        raise ValueError(f"{name} must be a finite number >= 0, got {val}")
    return float(val)


def _side_metrics(r_pos: torch.Tensor, r_neg: torch.Tensor) -> dict:
    nan = torch.tensor(float("nan"))
    p, n = r_pos.detach(), r_neg.detach()
    m = {"aligned_reward": p.mean() if p.numel() else nan, "unaligned_reward": n.mean() if n.numel() else nan}
    m["margin"] = m["aligned_reward"] - m["unaligned_reward"]
    return m


def _mean_or_zero(losses: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    # TRL's nanmean of an empty batch is NaN; a zero that keeps the graph lets backward() run.
    return losses.mean() if losses.numel() else anchor.sum() * 0.0


def kto_kl_completions(completions: list) -> list:
    """Completions for KTO's KL pairs: item i gets completion i - 1 (the first gets the last), as TRL pairs
    prompt x_i with y_{i-1} within each batch. Score (prompt_i, result[i]) under the policy and the reference
    (no gradient needed) and pass the summed log-probs as ``policy_kl_logps`` / ``ref_kl_logps``."""
    if len(completions) < 2:
        raise ValueError(f"completions needs at least 2 items to form mismatched pairs, got {len(completions)}")
    return [completions[-1]] + list(completions[:-1])


def kto_loss(policy_aligned_logps: torch.Tensor, policy_unaligned_logps: torch.Tensor,
             ref_aligned_logps: torch.Tensor, ref_unaligned_logps: torch.Tensor, *, beta: float = 0.1,
             kl=None, policy_kl_logps: Optional[torch.Tensor] = None, ref_kl_logps: Optional[torch.Tensor] = None,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024, eqn 7) as TRL's ``KTOTrainer`` computes it; returns ``(loss, metrics)``.

    With r = policy - ref log-probs per sequence and the reference point z0, the per-example losses are
    ``desirable_weight * (1 - sigmoid(beta (r+ - z0)))`` for aligned (desirable) sequences and
    ``undesirable_weight * (1 - sigmoid(beta (z0 - r-)))`` for unaligned ones; the loss is their plain
    mean over all examples of both sides (as TRL: weights scale terms, they do not renormalise).

    z0 is a KL estimate, detached and clamped at 0. Give it either as ``kl`` (a number or 0-d tensor, e.g.
    all-reduced across ranks; ``kl=0`` is the KL-free variant) or as the log-probs of mismatched
    (prompt, completion) pairs, ``policy_kl_logps`` and ``ref_kl_logps`` (see :func:`kto_kl_completions`),
    from which z0 = max(0, mean(policy_kl_logps - ref_kl_logps)), TRL's estimate. The matched pairs are
    never used for z0: their mean log-ratio is the implied reward itself, which would cancel the signal.

    Either side may be empty. ``metrics`` (detached): ``aligned_reward`` / ``unaligned_reward`` (mean
    beta * r, NaN for an empty side), ``margin`` and ``kl`` (z0).
    """
    _check_side_logps(policy_aligned_logps, policy_unaligned_logps, ref_aligned_logps, ref_unaligned_logps)
    beta = _check_beta(beta)
    dw = _check_weight("desirable_weight", desirable_weight)
    uw = _check_weight("undesirable_weight", undesirable_weight)
    given = policy_kl_logps is not None or ref_kl_logps is not None
    if kl is not None and given:
        raise ValueError("give kl or policy_kl_logps / ref_kl_logps, not both")
    if kl is not None:
        if isinstance(kl, bool) or not isinstance(kl, (int, float, torch.Tensor)):
            raise TypeError(f"kl must be a number or a 0-d tensor, got {type(kl).__name__}")
        if isinstance(kl, torch.Tensor) and kl.numel() != 1:
            raise ValueError(f"kl must hold one value, got shape {tuple(kl.shape)}")
        z0 = torch.as_tensor(kl, dtype=torch.float64).detach().reshape(())
        if not torch.isfinite(z0):
            raise ValueError(f"kl must be finite, got {float(z0)}")
    elif given:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("policy_kl_logps and ref_kl_logps must be given together")
        _check_logps(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
        if policy_kl_logps.dim() != 1 or policy_kl_logps.numel() == 0:
            raise ValueError(f"policy_kl_logps must be 1-D and non-empty, got shape {tuple(policy_kl_logps.shape)}")
        z0 = (_acc(policy_kl_logps) - _acc(ref_kl_logps)).mean().detach()
    else:
        raise ValueError("kto_loss needs its reference point: pass kl=... (e.g. 0.0 for no KL term) or "
                         "policy_kl_logps / ref_kl_logps of mismatched pairs (see kto_kl_completions)")

    lr_pos = _acc(policy_aligned_logps) - _acc(ref_aligned_logps)
    lr_neg = _acc(policy_unaligned_logps) - _acc(ref_unaligned_logps)
    z0 = z0.clamp(min=0).to(device=lr_pos.device, dtype=lr_pos.dtype)
    losses = torch.cat((dw * (1 - torch.sigmoid(beta * (lr_pos - z0))), uw * (1 - torch.sigmoid(beta * (z0 - lr_neg)))))
    loss = _mean_or_zero(losses, torch.cat((lr_pos, lr_neg)))
    metrics = _side_metrics(beta * lr_pos, beta * lr_neg)
    metrics["kl"] = z0.detach()
    return loss, metrics


class BCORunningMean:
    """Running mean of BCO's implicit rewards over every reward seen so far: the reward shift delta.

    The same update as TRL's ``RunningMoments`` (count-weighted, so after k batches delta is the mean of all
    their rewards); in distributed training update it with the rewards of all ranks so every rank keeps the
    same delta. ``state_dict`` / ``load_state_dict`` carry it through checkpoints.
    """

    def __init__(self):
        self.mean = 0.0
        self.count = 0

    def update(self, rewards: torch.Tensor) -> float:
        x = rewards.detach().reshape(-1).double()
        n = x.numel()
        if n:
            self.count += n
            self.mean += (float(x.mean()) - self.mean) * n / self.count
        return self.mean

    def reset(self) -> None:
        self.mean, self.count = 0.0, 0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def bco_loss(policy_aligned_logps: torch.Tensor, policy_unaligned_logps: torch.Tensor,
             ref_aligned_logps: torch.Tensor, ref_unaligned_logps: torch.Tensor, *, beta: float = 0.1,
             running_mean: Optional[BCORunningMean] = None, update: bool = True,
             unaligned_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization") as TRL's ``BCOTrainer``; ``(loss, metrics)``.

    The implicit reward r = beta * (policy - ref) log-probs is the logit of a binary classifier (aligned
    vs unaligned) shifted by delta: losses ``-log sigmoid(r+ - delta)`` and ``-log sigmoid(-(r- - delta))``,
    averaged over all examples of both sides. delta is the running mean of all rewards: with a
    :class:`BCORunningMean` it is first updated with this batch's rewards (unless ``update=False``, e.g. in
    evaluation) and then read, as TRL does; without one it is this batch's mean reward. delta is a constant
    for the gradient. ``unaligned_weights`` (1-D, one per unaligned example) scales the unaligned losses,
    e.g. TRL's underlying-distribution-matching density ratios; it is treated as a constant.

    ``metrics`` (detached): ``aligned_reward`` / ``unaligned_reward`` (mean r, NaN for an empty side),
    ``margin``, ``delta`` and ``accuracy`` (share of examples on the right side of delta).
    """
    _check_side_logps(policy_aligned_logps, policy_unaligned_logps, ref_aligned_logps, ref_unaligned_logps)
    beta = _check_beta(beta)
    if running_mean is not None and not isinstance(running_mean, BCORunningMean):
        raise TypeError(f"running_mean must be a BCORunningMean or None, got {type(running_mean).__name__}")
    if not isinstance(update, bool):
        raise TypeError(f"update must be a bool, got {type(update).__name__}")
    r_pos = beta * (_acc(policy_aligned_logps) - _acc(ref_aligned_logps))
    r_neg = beta * (_acc(policy_unaligned_logps) - _acc(ref_unaligned_logps))
    if unaligned_weights is not None:
        if not isinstance(unaligned_weights, torch.Tensor) or not unaligned_weights.dtype.is_floating_point:
            raise TypeError("unaligned_weights must be a floating-point torch.Tensor or None")
        if unaligned_weights.shape != r_neg.shape:
            raise ValueError(f"unaligned_weights shape {tuple(unaligned_weights.shape)} does not match "
                             f"policy_unaligned_logps shape {tuple(r_neg.shape)}")
    rewards = torch.cat((r_pos, r_neg)).detach()
    if running_mean is not None:
        if update:
            running_mean.update(rewards)
        delta = torch.tensor(running_mean.mean, dtype=r_pos.dtype, device=r_pos.device)
    else:
        delta = rewards.mean() if rewards.numel() else rewards.new_zeros(())
    neg = -F.logsigmoid(-(r_neg - delta))
    if unaligned_weights is not None:
        neg = unaligned_weights.detach().to(neg.dtype) * neg
    loss = _mean_or_zero(torch.cat((-F.logsigmoid(r_pos - delta), neg)), torch.cat((r_pos, r_neg)))
    metrics = _side_metrics(r_pos, r_neg)
    metrics["delta"] = delta.detach()
    right = (r_pos.detach() > delta).sum() + (r_neg.detach() < delta).sum()
    metrics["accuracy"] = right.to(r_pos.dtype) / rewards.numel() if rewards.numel() else torch.tensor(float("nan"))
    return loss, metrics
