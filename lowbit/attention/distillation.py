"""Self-distillation of SeerAttention gates, and saving / loading / applying them.

The base model is frozen; each layer's gate learns the block-pooled attention map of that same
layer (computed exactly by `attention_with_block_pool` during an ordinary forward pass). The loss is
the sum over layers of the mean row KL(pooled || gate); only gate weights receive gradients. The
optimiser follows the official recipe: AdamW, lr 1e-3, no weight decay, linear warmup then cosine.
Under torchrun / deepspeed (WORLD_SIZE > 1) every rank reads its own batches and the gate gradients
are averaged with an all-reduce before each step (the gates are a few MB: no sharding needed).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as tdist

from . import model as seer_model
from .gate import AttnGate

FORMAT = "lowbit-seer-gates-v1"


def freeze_base(model) -> list[torch.nn.Parameter]:
    """requires_grad only on gate parameters; returns them."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, attn in seer_model.attention_layers(model):
        if not hasattr(attn, "seer_gate"):
            raise ValueError("model: a layer has no gate; call attach_gates first")
        for p in attn.seer_gate.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def distill_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over layers of the gate KL for one batch (the model must be in distill mode)."""
    model(input_ids=input_ids, use_cache=False)
    losses = [rt.loss for rt in seer_model.runtimes(model)]
    if any(loss is None for loss in losses):
        raise RuntimeError("distill_loss: a layer produced no gate loss (is every layer in 'distill' mode?)")
    for rt in seer_model.runtimes(model):
        rt.loss = None
    return torch.stack(losses).sum()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def distill(model, batches: Iterable[torch.Tensor], *, steps: int, lr: float = 1e-3, warmup: int = 20,
            weight_decay: float = 0.0, grad_clip: float = 1.0, log: Callable[[dict], None] | None = None,
            log_every: int = 10) -> list[float]:
    """Train the attached gates for `steps` batches of token ids [B, S]; returns the loss of every step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    params = freeze_base(model)
    seer_model.configure(model, "distill")
    model.eval()  # no dropout in the frozen base; gates have none
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    it: Iterator = iter(batches)
    history = []
    t0 = time.perf_counter()
    for step in range(steps):
        try:
            ids = next(it)
        except StopIteration:
            raise ValueError(f"batches: ran out after {step} of {steps} steps") from None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = distill_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in params:
                tdist.all_reduce(p.grad)
                p.grad.div_(world)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else None
        opt.step()
        value = loss.detach()
        if world > 1:
            tdist.all_reduce(value)
            value /= world
        history.append(float(value))
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log({"step": step + 1, "loss": history[-1], "lr": opt.param_groups[0]["lr"],
                 "grad_norm": float(norm) if norm is not None else None,
                 "tokens_per_s": (step + 1) * ids.numel() * world / (time.perf_counter() - t0)})
    seer_model.configure(model, "dense")
    return history


@torch.no_grad()
def evaluate_kl(model, batches: Iterable[torch.Tensor]) -> float:
    """Mean distillation loss over the given batches (no training)."""
    seer_model.configure(model, "distill")
    vals = [float(distill_loss(model, ids)) for ids in batches]
    seer_model.configure(model, "dense")
    if not vals:
        raise ValueError("batches: no batches to evaluate")
    return sum(vals) / len(vals)


def save_gates(model, path: str, extra: dict | None = None) -> None:
    """Only the gate weights (and their configuration), keyed by attention-layer name."""
    layers = {}
    cfg = None
    for name, attn in seer_model.attention_layers(model):
        gate: AttnGate = attn.seer_gate
        layers[name] = {k: v.detach().cpu() for k, v in gate.state_dict().items()}
        cfg = gate.config()
    torch.save({"format": FORMAT, "gate": cfg, "layers": layers, "extra": extra or {}}, path)


def load_gates(model, path: str) -> list[AttnGate]:
    """Attach gates to `model` and fill them from `save_gates` output; layer names and shapes must match."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"gates_path: {path!r} is not a lowbit SeerAttention gate file")
    cfg = blob["gate"]
    names = [n for n, _ in seer_model.attention_layers(model)]
    if sorted(names) != sorted(blob["layers"]):
        raise ValueError(f"gates_path: the file holds gates for layers {sorted(blob['layers'])[:3]}..., "
                         f"the model has {sorted(names)[:3]}... ({len(blob['layers'])} vs {len(names)} layers)")
    gates = seer_model.attach_gates(model, block_size=cfg["block_size"], gate_dim=cfg["gate_dim"],
                                    q_pool=tuple(cfg["q_pool"]), k_pool=tuple(cfg["k_pool"]))
    for (name, attn) in seer_model.attention_layers(model):
        attn.seer_gate.load_state_dict(blob["layers"][name])
    return gates


def apply_seer(model, gates_path: str, *, threshold: float | None = None, density: float | None = None):
    """Load trained gates onto `model` and run its attention block-sparse at `threshold` or `density`.

    Returns the model (changed in place). `lowbit.attention.model.measured_density(model)` reports
    the density that the selection actually reached on the data seen since.
    """
    if (threshold is None) == (density is None):
        raise ValueError("apply_seer: give exactly one of threshold or density")
    load_gates(model, gates_path)
    for p in model.parameters():
        p.requires_grad_(False)
    seer_model.configure(model, "gate", threshold=threshold, density=density)
    return model
