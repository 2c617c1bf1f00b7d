"""Optimizer and learning-rate schedule from the config."""
from __future__ import annotations

import math

import torch

from ..optim import CLASSP, SPAM, StableSPAM


def build(params, cfg) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optim; ``optim.args`` adds keyword arguments (errors name the key)."""
    o = cfg.optim
    extra = dict(o.args)
    betas = tuple(o.betas)
    try:
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay, **extra)
        if o.name == "classp":
            return CLASSP(params, lr=o.lr, **extra)
        cls = StableSPAM if o.name == "stable_spam" else SPAM
        kw = dict(lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay, state_dtype=o.state_dtype,
                  seed=cfg.train.seed)
        if cls is StableSPAM:
            kw["total_steps"] = None
        kw.update(extra)
        return cls(params, **kw)
    except TypeError as e:
        raise ValueError(f"optim.args: {o.name} rejected the arguments {sorted(extra)}: {e}") from None
    except ValueError as e:
        raise ValueError(f"optim ({o.name}): {e}") from None


def check(cfg) -> None:
    """Build the optimizer on a dummy parameter so bad values fail before any work."""
    build([torch.nn.Parameter(torch.zeros(2))], cfg)


def lr_lambda(cfg):
    """Multiplier of optim.lr at step s: linear warm-up, then cosine / linear decay to min_lr_ratio, or constant."""
    o, total = cfg.optim, cfg.train.steps
    warm, floor = o.warmup_steps, o.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if o.schedule == "linear":
            return 1.0 - (1.0 - floor) * frac
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
