"""The loss of one micro-batch for each task, on top of `lowbit.objectives`.

Pretraining is next-token NLL over every position; SFT applies the configured objective to the
response tokens; alignment computes sequence log-probs of the policy and the frozen reference and
applies DPO (f-DPO), KLDO, KTO or BCO. Each returns (loss, metrics dict of floats, number of target
tokens). Rows holding several documents pass their ``position_ids`` (`data.model_inputs`).
"""
from __future__ import annotations

import torch

from ..objectives import (BCORunningMean, KLDORunningMean, bco_loss, dpo_loss, fused_linear_sft_loss, kldo_loss,
                          kto_kl_completions, kto_loss, sequence_logps, sft_loss)
from .data import model_inputs

IGNORE = -100


def _unwrap(model):
    return getattr(model, "module", model)


def token_loss(model, batch: dict, obj, objective: str | None = None) -> tuple[torch.Tensor, dict, int]:
    """Objective over shifted labels (position t predicts t+1); -100 positions are ignored."""
    labels = batch["labels"]
    target = labels[:, 1:]
    kw = {"objective": objective or obj.name}
    if objective is None:
        kw.update(alpha=obj.alpha, tau=obj.tau, fraction=obj.fraction)
    n = int((target != IGNORE).sum())
    if obj.fused:
        inner = _unwrap(model)
        # base_model / output embeddings: the trunk and head of any HF causal LM (Llama's model, GPT-2's transformer)
        hidden = inner.base_model(**model_inputs(batch)).last_hidden_state[:, :-1]
        loss = fused_linear_sft_loss(hidden, inner.get_output_embeddings().weight, target, **kw)
    else:
        logits = model(**model_inputs(batch)).logits[:, :-1]
        loss = sft_loss(logits, target, **kw)
    return loss, {}, n


def _seq_logps(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return sequence_logps(logits, labels[:, 1:])


def kl_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's mismatched pairs: prompt i with the response of item i - 1 (`kto_kl_completions`), cut to the
    row length; only the borrowed response is scored."""
    ids, labels = batch["input_ids"], batch["labels"]
    starts, ends = batch["prompt_len"].tolist(), batch["length"].tolist()
    responses = [(ids[i, s:e], labels[i, s:e]) for i, (s, e) in enumerate(zip(starts, ends))]
    out_ids, out_labels = torch.zeros_like(ids), torch.full_like(labels, IGNORE)
    width = ids.shape[1]
    for i, (r_ids, r_labels) in enumerate(kto_kl_completions(responses)):
        row = torch.cat([ids[i, :starts[i]], r_ids])[:width]
        lab = torch.cat([torch.full_like(ids[i, :starts[i]], IGNORE), r_labels])[:width]
        out_ids[i, :len(row)], out_labels[i, :len(lab)] = row, lab
    return out_ids, out_labels


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's copy of ``x`` (same shape everywhere), so running statistics agree across ranks."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _pair_accuracy(pos: torch.Tensor, neg: torch.Tensor) -> float | None:
    """Share of (aligned, unaligned) pairs whose rewards are ordered right; None with an empty side."""
    if not pos.numel() or not neg.numel():
        return None
    return float((pos[:, None] > neg[None, :]).float().mean())


class Preference:
    """DPO / KLDO / KTO / BCO against a frozen reference model (outside the engine, full copy on each rank)."""

    def __init__(self, cfg, reference: torch.nn.Module):
        self.cfg = cfg.align
        self.reference = reference.eval().requires_grad_(False)
        self.running = KLDORunningMean() if self.cfg.method == "kldo" else None
        self.bco = BCORunningMean() if self.cfg.method == "bco" else None

    def loss(self, model, batch: dict, train: bool = True) -> tuple[torch.Tensor, dict, int]:
        """``train=False`` (evaluation) leaves KLDO's and BCO's running statistics untouched."""
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
            sides = (pol[pos], pol[~pos], ref[pos], ref[~pos])
            if a.method == "kldo":
                loss, m = kldo_loss(*sides, beta=a.beta, running_mean=self.running if train else None)
            elif a.method == "kto":
                kl = {"kl": 0.0}  # one example (an evaluation remainder) has no mismatched pair: z0 = 0
                if ids.shape[0] > 1:
                    kl_ids, kl_labels = kl_batch(batch)
                    with torch.no_grad():  # z0 is a detached estimate: no gradient through the mismatched pairs
                        kl = {"policy_kl_logps": _seq_logps(model, kl_ids, kl_labels),
                              "ref_kl_logps": _seq_logps(self.reference, kl_ids, kl_labels)}
                loss, m = kto_loss(*sides, beta=a.beta, desirable_weight=a.desirable_weight,
                                   undesirable_weight=a.undesirable_weight, **kl)
                acc = _pair_accuracy(pol[pos].detach() - ref[pos], pol[~pos].detach() - ref[~pos])
                if acc is not None:
                    m["accuracy"] = torch.tensor(acc)
            else:
                if train:  # delta is the mean reward over all ranks' examples, updated before it is read
                    self.bco.update(_all_gather(a.beta * (pol.detach() - ref)))
                loss, m = bco_loss(*sides, beta=a.beta, running_mean=self.bco, update=False)
        stats = {k: float(v) for k, v in m.items() if v.dim() == 0 and torch.isfinite(v)}
        return loss, stats, int((labels[:, 1:] != IGNORE).sum())

    def state(self) -> dict:
        lv = self.running.log_value if self.running is not None else None
        return {"kldo_log_mean": lv, "bco_running_mean": self.bco.state_dict() if self.bco is not None else None}

    def load(self, st: dict) -> None:
        if self.running is not None:
            self.running.log_value = st.get("kldo_log_mean")
        if self.bco is not None and st.get("bco_running_mean") is not None:
            self.bco.load_state_dict(st["bco_running_mean"])
