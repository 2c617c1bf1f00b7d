"""Suite `train`: tokens/s of whole training steps per recipe, relative to `bf16` in the same run.

For each model (tiny and llama-125m, from configs/pretrain/) and recipe, a fresh Llama is built
and converted, and a training step (forward, loss, backward, gradient clipping, AdamW step) on a
fixed random token batch is timed (throughput does not depend on the text). work = tokens per step,
so rate = tokens/s. The peer `bf16` is the same step with the `bf16` recipe (nn.Linear), so
`speedup_vs_bf16` is the recipe's tokens/s over bf16's. On CPU the quantized recipes are emulated
(quantize, dequantize, fp32 GEMM), so that ratio is the emulation's cost, not a speed-up.
On a GPU each recipe also runs under a one-rank DeepSpeed engine with ZeRO 1 and ZeRO 3, and
`peak_memory_gib` is the peak GPU memory of the step.
"""
from __future__ import annotations

import os

import torch

from .suite import Context, Row

DESCRIPTION = "training step tokens/s per recipe (tiny, llama-125m) vs the bf16 recipe; ZeRO 1/3 memory on GPU"
PARAMS = ("model", "recipe", "zero_stage", "parameters", "batch", "seq_len", "peak_memory_gib")
PEERS = {"bf16": None}

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {"tiny": "configs/pretrain/tiny.yaml", "llama-125m": "configs/pretrain/125m.yaml",
           "llama-1b": "configs/pretrain/1b.yaml"}
# sequences x tokens per step on CPU (the 125M step is kept to seconds); on a GPU, ctx.tokens per step
CPU_BATCH = {"tiny": (16, 128), "llama-125m": (1, 256), "llama-1b": (1, 128)}


def config(model: str, recipe: str, batch: int, seq: int, zero: int | None):
    from ..train import load

    over = [f"quant.recipe={recipe}", f"train.micro_batch_size={batch}", f"data.seq_len={seq}", "optim.name=adamw",
            "model.dtype=float32" if not torch.cuda.is_available() else "model.dtype=bfloat16"]
    if zero is not None:
        over += ["dist.engine=deepspeed", f"dist.zero_stage={zero}"]
    return load([os.path.join(REPO, CONFIGS[model])], over)


class Step:
    """One model + optimizer (+ engine) and a closure that runs a training step."""

    def __init__(self, cfg, device: str, zero: int | None):
        from ..train import dist as D, model as model_mod, optim as optim_mod

        self.cfg, self.zero, self.env = cfg, zero, None
        model = model_mod.build(cfg, cfg.data.vocab_size, {"eos": 0, "pad": 1, "bos": 0}).to(device)
        self.parameters = model_mod.count_parameters(model)
        opt = optim_mod.build(model.parameters(), cfg)
        sched = optim_mod.scheduler(opt, cfg)
        if zero is not None:
            self.env = D.setup(cfg)
            model, opt, sched = D.wrap(model, opt, sched, cfg, self.env, cfg.train.micro_batch_size, 1)
        self.model, self.opt = model, opt
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.data.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=g)
        self.batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self):
        from ..train import losses

        loss, _, _ = losses.token_loss(self.model, self.batch, self.cfg.objective, "nll")
        if self.zero is not None:
            self.model.backward(loss)
            self.model.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sync()

    def close(self):
        from ..train import dist as D

        if self.env is not None:
            D.teardown(self.env)


def measure(ctx: Context, model: str, recipe: str, batch: int, seq: int, zero: int | None):
    """(Timing, parameters, peak GiB) of one training step, or (None, None, None, reason)."""
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = Step(config(model, recipe, batch, seq, zero), ctx.device, zero)
    try:
        t = ctx.time(step, f"{model} {recipe}", warmup=1, min_runs=2 if ctx.quick else 3, min_time=0.0)
    finally:
        step.close()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if ctx.device == "cuda" else None
    return t, step.parameters, peak


def run(ctx: Context) -> list[Row]:
    from ..nn import RECIPE_NAMES

    rows = []
    zeros = [None] + ([1, 3] if ctx.device == "cuda" else [])
    for shape in ctx.models(default=("tiny", "llama-125m"), quick=("tiny",)):
        if shape.name not in CONFIGS:
            rows.append(Row(f"{shape.name}", None, note=f"no training config for {shape.name}"))
            continue
        batch, seq = CPU_BATCH[shape.name] if ctx.device == "cpu" else (max(1, ctx.tokens // shape.seq), shape.seq)
        if ctx.quick and ctx.device == "cpu":
            batch = max(1, batch // 4)
        for zero in zeros:
            base = None
            for recipe in ("bf16",) + tuple(r for r in RECIPE_NAMES if r != "bf16"):
                case = f"{shape.name} {recipe}" + (f" zero{zero}" if zero is not None else "")
                params = dict(model=shape.name, recipe=recipe, zero_stage=zero, batch=batch, seq_len=seq)
                ctx.console(f"train: {case} ...")
                try:
                    t, n, peak = measure(ctx, shape.name, recipe, batch, seq, zero)
                except (RuntimeError, ValueError, NotImplementedError) as e:  # a recipe this device cannot run
                    rows.append(Row(case, None, params=params, note=f"failed: {str(e).splitlines()[0][:160]}"))
                    continue
                if recipe == "bf16":
                    base = t
                rows.append(Row(case, t, shape=f"{batch}x{seq}", dtype="fp32" if ctx.device == "cpu" else "bf16",
                                work=batch * seq, unit="tokens/s", peers={"bf16": base} if base else {},
                                params={**params, "parameters": n, "peak_memory_gib": peak}))
    return rows
