"""Pretraining with injected gradient spikes, for the optimizer-stability arm.

`lowbit.train.run` has no hook between backward and the optimizer step, so this module runs the
same pieces (`lowbit.train` data, model + recipe, optimizer, schedule, the plain-PyTorch step
adapter, loss and evaluation) in a single-process loop and, at the steps of a `SpikePlan`,
multiplies a random fraction of the entries of every weight-matrix gradient by a large factor
before clipping and the optimizer step, the way the SPAM / Stable-SPAM papers describe spikes:
rare, sparse, and orders of magnitude above the usual gradient. With `plan=None` the loop is the
clean control of the same arm.

It writes `metrics.jsonl` (train and eval records as `lowbit.train` writes them) and
`summary.json` to the run directory and returns the summary.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from ..train import config as cfgmod, data as data_mod, dist as D, evaluate, losses, model as model_mod
from ..train import optim as optim_mod, pretrained


@dataclass(frozen=True)
class SpikePlan:
    start: int = 20  # first spiked step
    every: int = 25  # then every `every` steps
    fraction: float = 1e-3  # of each weight matrix's gradient entries
    factor: float = 1000.0  # multiplier of those entries
    seed: int = 1234

    def at(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0


def inject(params: list[torch.nn.Parameter], plan: SpikePlan, step: int) -> int:
    """Multiply a random `plan.fraction` of each >= 2-D gradient's entries by `plan.factor`; returns how many."""
    n = 0
    for i, p in enumerate(params):
        if p.grad is None or p.grad.dim() < 2:
            continue
        g = torch.Generator(device="cpu").manual_seed(plan.seed + 1_000_003 * step + i)
        mask = (torch.rand(p.grad.shape, generator=g) < plan.fraction).to(p.grad.device)
        p.grad[mask] *= plan.factor
        n += int(mask.sum())
    return n


def train(cfg, plan: SpikePlan | None) -> dict:
    """Pretrain per `cfg` (a lowbit.train Config, task pretrain) with gradient spikes per `plan`."""
    cfgmod.validate(cfg)
    if cfg.task != "pretrain":
        raise ValueError(f"task: the spike loop pretrains, got {cfg.task!r}")
    env = D.setup(cfg.dist.engine, cfg.dist.zero_stage)
    if env.world != 1:
        raise RuntimeError("the spike loop runs in a single process")
    wall0 = time.time()
    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    tok, train_set, val_set, source = data_mod.pretrain_data(cfg)
    model = model_mod.build(cfg, len(tok), pretrained.special_ids(tok)).to(env.device)
    optimizer = optim_mod.build([p for p in model.parameters() if p.requires_grad], cfg)
    mbs = cfg.train.micro_batch_size
    engine = D.TorchEngine(model, optimizer, optim_mod.scheduler(optimizer, cfg), cfg, env, accum=1)
    order = data_mod.Order(len(train_set), cfg.train.seed)
    spiked, status, loss_avg, tokens = 0, "completed", None, 0
    last: dict = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as log:
        def evaluate_at(step):
            res = evaluate.language_model(model, val_set, batches=cfg.train.eval_batches, batch_size=mbs, env=env)
            res.pop("val_exact_match", None)
            log.write(json.dumps({"step": step, "kind": "eval", **res}) + "\n")
            return res

        model.train()
        for step in range(cfg.train.steps):
            batch = data_mod.load_batch(train_set, order, data_mod.positions(step, 0, 0, 1, mbs, mbs), env.device)
            loss, _, n = losses.token_loss(model, batch, cfg.objective, "nll")
            if not torch.isfinite(loss):
                status = f"diverged at step {step + 1} (non-finite loss)"
                break
            engine.backward(loss)
            injected = inject(engine.params, plan, step + 1) if plan is not None and plan.at(step + 1) else 0
            spiked += bool(injected)
            gnorm, _ = engine.step(skip=False)
            loss_val, tokens = float(loss.detach()), tokens + n
            loss_avg = loss_val if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_val
            log.write(json.dumps({"step": step + 1, "kind": "train", "loss": loss_val, "grad_norm": gnorm,
                                  "spike_entries": injected}) + "\n")
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
                evaluate_at(step + 1)
        last = evaluate_at(step + 1) if status == "completed" else {"val_loss": math.nan}
    D.teardown(env)
    summary = {"task": "pretrain", "status": status, "steps": cfg.train.steps, "recipe": cfg.quant.recipe,
               "optimizer": cfg.optim.name, "parameters": model_mod.count_parameters(model), "data": source,
               "train_loss": loss_avg, **last, "tokens": tokens, "spiked_steps": spiked,
               "spike_plan": asdict(plan) if plan else None, "wall_time_s": time.time() - wall0,
               "run_dir": os.path.abspath(run_dir)}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
