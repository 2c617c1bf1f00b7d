"""Where a task sits on the model-capability continuum, and the SFT objective that goes with it.

"Beyond Log Likelihood" (Li et al. 2025, arXiv:2510.00526; Fig. 1 and the continuum it summarises, restated
in the abstract) finds: near the model-strong end, where the base model already puts high probability on
the training targets, prior-leaning objectives (-p, -p^10, thresholded variants) consistently beat NLL; near
the model-weak end NLL dominates; in the model-intermediate region no single objective prevails. The paper
places tasks on the continuum qualitatively (by how much of the task pretraining covered) and gives no
numeric cut-points; lowbit measures the position as the mean target probability under the base model
(:func:`prior_strength`) and applies :func:`auto_objective`, whose cut-points are lowbit's defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional

import torch

from .sft import _acc, _check_labels

__all__ = ["AutoObjective", "auto_objective", "PriorStrength", "prior_strength", "STRONG", "WEAK"]

STRONG = 0.5
WEAK = 0.2


class AutoObjective(NamedTuple):
    """Result of :func:`auto_objective`; unpacks as ``(objective, reason)``."""

    objective: str
    reason: str


def _check_cuts(weak: Any, strong: Any) -> tuple[float, float]:
    for name, val in (("weak", weak), ("strong", strong)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(val).__name__}")
    if not 0.0 <= weak <= strong <= 1.0:
        raise ValueError(f"need 0 <= weak <= strong <= 1, got weak={weak}, strong={strong}")
    return float(weak), float(strong)


def _regime(mean_prob: float, weak: float, strong: float) -> str:
    return "strong" if mean_prob >= strong else "weak" if mean_prob <= weak else "intermediate"


def auto_objective(mean_prob: float, *, strong: float = STRONG, weak: float = WEAK) -> AutoObjective:
    """Pick the SFT objective from ``mean_prob``, the base model's mean probability of the training targets.

    Rule (the continuum of "Beyond Log Likelihood", Fig. 1; cut-points ``strong`` / ``weak`` are lowbit's
    defaults, 0.5 and 0.2, since the paper gives none):

    * ``mean_prob >= strong`` (model-strong): ``"neg_p"``, the paper's -p, its main prior-leaning objective.
    * ``mean_prob <= weak`` (model-weak): ``"nll"``.
    * in between (model-intermediate, where the paper finds no winner): the family (1 - p^a) / a, which
      runs from NLL (a -> 0) to -p (a = 1), with a interpolated linearly in ``mean_prob`` between the two
      cut-points, ``a = (mean_prob - weak) / (strong - weak)`` rounded to 2 decimals (at least 0.01);
      returned as ``"GeneralFamily-<a>"``.

    The returned objective is a complete ``sft_loss(objective=...)`` value (no ``alpha`` to pass).
    """
    if isinstance(mean_prob, bool) or not isinstance(mean_prob, (int, float)):
        raise TypeError(f"mean_prob must be a number, got {type(mean_prob).__name__}")
    if not 0.0 <= mean_prob <= 1.0:
        raise ValueError(f"mean_prob must lie in [0, 1], got {mean_prob}")
    weak, strong = _check_cuts(weak, strong)
    where = f"mean target probability {mean_prob:.4g}"
    regime = _regime(mean_prob, weak, strong)
    if regime == "strong":
        return AutoObjective("neg_p", f"{where} >= strong={strong:g} (model-strong): prior-leaning -p, which the "
                                      "paper finds beats NLL near the model-strong end")
    if regime == "weak":
        return AutoObjective("nll", f"{where} <= weak={weak:g} (model-weak): NLL, which the paper finds "
                                    "dominant near the model-weak end")
    a = max(0.01, round((mean_prob - weak) / (strong - weak), 2))
    return AutoObjective(f"GeneralFamily-{a:g}",
                         f"{where} between weak={weak:g} and strong={strong:g} (model-intermediate, no single "
                         f"objective prevails in the paper): (1 - p^a) / a with a={a:g}, interpolated from NLL "
                         f"(a -> 0 at weak) to -p (a = 1 at strong)")


@dataclass(frozen=True)
class PriorStrength:
    """Result of :func:`prior_strength`."""

    mean_prob: float
    num_tokens: int
    regime: str
    recommended_objective: str
    explanation: str

    def __str__(self) -> str:
        return (f"{self.regime} prior over {self.num_tokens} tokens -> objective {self.recommended_objective}: "
                f"{self.explanation}")


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
                   max_batches: Optional[int] = None, strong: float = STRONG, weak: float = WEAK,
                   shift: bool = True) -> PriorStrength:
    """Mean predicted probability of the training targets under the (base) ``model``, and the objective
    :func:`auto_objective` picks for it.

    Batches are dicts (``labels`` plus the model's keyword inputs, e.g. ``input_ids``) or
    ``(input_ids, labels)`` pairs; the model returns logits or an object with ``.logits``. With
    ``shift=True`` (Hugging Face convention) position t predicts ``labels[t + 1]``.
    """
    weak, strong = _check_cuts(weak, strong)
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
    mean = min(1.0, total / count)
    choice = auto_objective(mean, strong=strong, weak=weak)
    return PriorStrength(mean, count, _regime(mean, weak, strong), choice.objective, choice.reason)
