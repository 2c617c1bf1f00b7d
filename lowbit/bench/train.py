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

from ..nn import RECIPE_NAMES
from ..train import dist as D, load, losses, model as model_mod, optim as optim_mod
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
    over = [f"quant.recipe={recipe}", f"train.micro_batch_size={batch}", f"data.seq_len={seq}", "optim.name=adamw",
            "model.dtype=float32" if not torch.cuda.is_available() else "model.dtype=bfloat16"]
    over += ["dist.engine=torch", "dist.zero_stage=0"] if zero is None else \
        ["dist.engine=deepspeed", f"dist.zero_stage={zero}"]
    return load([os.path.join(REPO, CONFIGS[model])], over)


class Step:
    """One model, optimizer and engine (`lowbit.train.dist`'s step adapter), and a closure that runs
    a training step as `lowbit.train.run` does."""

    def __init__(self, cfg, device: str):
        self.cfg = cfg
        model = model_mod.build(cfg, cfg.data.vocab_size, {"eos": 0, "pad": 1, "bos": 0}).to(device)
        self.parameters = model_mod.count_parameters(model)
        opt = optim_mod.build(model.parameters(), cfg)
        self.env = D.setup(cfg.dist.engine, cfg.dist.zero_stage)  # plain PyTorch, or a one-rank DeepSpeed group
        self.engine = D.engine(model, opt, optim_mod.scheduler(opt, cfg), cfg, self.env, cfg.train.micro_batch_size, 1)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.data.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=g)
        self.batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self):
        loss, _, _ = losses.token_loss(self.engine.model, self.batch, self.cfg.objective, "nll")
        self.engine.backward(loss)
        self.engine.step(skip=False)
        self.sync()

    def close(self):
        D.teardown(self.env)


def measure(ctx: Context, model: str, recipe: str, batch: int, seq: int, zero: int | None):
    """(Timing, parameters, peak GiB) of one training step, or (None, None, None, reason)."""
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = Step(config(model, recipe, batch, seq, zero), ctx.device)
    try:
        t = ctx.time(step, f"{model} {recipe}", warmup=1, min_runs=2 if ctx.quick else 3, min_time=0.0)
    finally:
        step.close()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if ctx.device == "cuda" else None
    return t, step.parameters, peak


def run(ctx: Context) -> list[Row]:
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
