"""Held-out evaluation: perplexity, exact-match accuracy on SFT data, preference accuracy.

Validation sequences are read in their stored order (no shuffling), split over ranks, and the sums
are all-reduced, so the numbers do not depend on the number of ranks.
"""
from __future__ import annotations

import math

import torch

from . import dist as D
from .data import collate, model_inputs

IGNORE = -100


def _rng_neutral(env: D.Env):
    """Evaluation must not advance the training RNG (quantized layers draw rounding seeds from it),
    so a run evaluates or checkpoints at any step without changing what it trains afterwards."""
    return torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else [])


def _batches(dataset, batches: int, batch_size: int, env: D.Env):
    n = min(len(dataset), batches * batch_size)
    mine = list(range(env.rank, n, env.world))
    for i in range(0, len(mine), batch_size):
        yield collate([dataset[j] for j in mine[i:i + batch_size]])


def language_model(model, dataset, *, batches: int, batch_size: int, env: D.Env) -> dict:
    with _rng_neutral(env), torch.no_grad():
        return _language_model(model, dataset, batches, batch_size, env)


def preference(model, pref, dataset, *, batches: int, batch_size: int, env: D.Env) -> dict:
    """Mean loss and reward accuracy of the alignment objective on held-out data."""
    with _rng_neutral(env), torch.no_grad():
        return _preference(model, pref, dataset, batches, batch_size, env)


def _language_model(model, dataset, batches: int, batch_size: int, env: D.Env) -> dict:
    """Token-weighted NLL and perplexity; exact-match = every response token is the argmax
    (equivalent to greedy decoding reproducing the response)."""
    was = model.training
    model.eval()
    nll, tokens, exact, seqs = 0.0, 0, 0, 0
    try:
        for b in _batches(dataset, batches, batch_size, env):
            ids, target = b["input_ids"].to(env.device), b["labels"][:, 1:].to(env.device)
            logits = model(**model_inputs(b, env.device)).logits[:, :-1].float()
            valid = target != IGNORE
            logp = torch.log_softmax(logits, -1)
            safe = torch.where(valid, target, torch.zeros_like(target))
            tok_lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            nll -= float(tok_lp[valid].sum(dtype=torch.float64))
            tokens += int(valid.sum())
            right = (logits.argmax(-1) == target) | ~valid
            exact += int(right.all(-1).sum())
            seqs += ids.shape[0]
    finally:
        model.train(was)
    nll, tokens, exact, seqs = D.all_sum(env, nll, tokens, exact, seqs)
    if tokens == 0:
        raise ValueError("evaluation: the validation data holds no target tokens")
    loss = nll / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(tokens),
            "val_exact_match": exact / seqs}


def _preference(model, pref, dataset, batches: int, batch_size: int, env: D.Env) -> dict:
    was = model.training
    model.eval()
    total, acc, n = 0.0, 0.0, 0
    try:
        for b in _batches(dataset, batches, batch_size, env):
            b = {k: v.to(env.device) for k, v in b.items()}
            loss, m, _ = pref.loss(model, b, train=False)
            total += float(loss)
            acc += m.get("accuracy", 0.0)
            n += 1
    finally:
        model.train(was)
    total, acc, n = D.all_sum(env, total, acc, n)
    return {"val_loss": total / max(n, 1), "val_reward_accuracy": acc / max(n, 1)}
