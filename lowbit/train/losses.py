"""The loss of one micro-batch for each task, on top of `lowbit.objectives`.

Pretraining is next-token NLL over every position; SFT applies the configured objective to the
response tokens; alignment computes sequence log-probs of the policy and the frozen reference and
applies DPO (f-DPO) or KLDO. Each returns (loss, metrics dict of floats, number of target tokens).
"""
from __future__ import annotations

import torch

from ..objectives import (KLDORunningMean, dpo_loss, fused_linear_sft_loss, kldo_loss, sequence_logps, sft_loss)

IGNORE = -100


def _unwrap(model):
    return getattr(model, "module", model)


def token_loss(model, batch: dict, obj, objective: str | None = None) -> tuple[torch.Tensor, dict, int]:
    """Objective over shifted labels (position t predicts t+1); -100 positions are ignored."""
    ids, labels = batch["input_ids"], batch["labels"]
    target = labels[:, 1:]
    kw = {"objective": objective or obj.name, "alpha": obj.alpha, "tau": obj.tau, "p": obj.p}
    n = int((target != IGNORE).sum())
    if obj.fused:
        inner = _unwrap(model)
        hidden = inner.model(input_ids=ids).last_hidden_state[:, :-1]
        loss = fused_linear_sft_loss(hidden, inner.lm_head.weight, target, **kw)
    else:
        logits = model(input_ids=ids).logits[:, :-1]
        loss = sft_loss(logits, target, **kw)
    return loss, {}, n


def _seq_logps(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return sequence_logps(logits, labels[:, 1:])


class Preference:
    """DPO / KLDO against a frozen reference model (kept outside the engine, full copy on each rank)."""

    def __init__(self, cfg, reference: torch.nn.Module):
        self.cfg = cfg.align
        self.reference = reference.eval().requires_grad_(False)
        self.running = KLDORunningMean() if self.cfg.method == "kldo" else None

    def loss(self, model, batch: dict, train: bool = True) -> tuple[torch.Tensor, dict, int]:
        """``train=False`` (evaluation) leaves KLDO's moving average untouched."""
        a = self.cfg
        if a.method == "dpo":
            ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
            labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
            b = batch["chosen_ids"].shape[0]
            pol = _seq_logps(model, ids, labels)
            with torch.no_grad():
                ref = _seq_logps(self.reference, ids, labels)
            loss, m = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=a.beta, divergence=a.divergence,
                               alpha=a.alpha, label_smoothing=a.label_smoothing)
        else:
            ids, labels, pos = batch["input_ids"], batch["labels"], batch["aligned"]
            pol = _seq_logps(model, ids, labels)
            with torch.no_grad():
                ref = _seq_logps(self.reference, ids, labels)
            loss, m = kldo_loss(pol[pos], pol[~pos], ref[pos], ref[~pos], beta=a.beta, running_mean=self.running if train else None)
        stats = {k: float(v) for k, v in m.items() if v.dim() == 0 and torch.isfinite(v)}
        return loss, stats, int((labels[:, 1:] != IGNORE).sum())

    def state(self) -> dict:
        lv = self.running.log_value if self.running is not None else None
        return {"kldo_log_mean": lv}

    def load(self, st: dict) -> None:
        if self.running is not None:
            self.running.log_value = st.get("kldo_log_mean")
