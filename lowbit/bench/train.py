"""Training throughput per recipe: tokens/s of whole optimizer steps, relative to `bf16` in the same run.

For each model config (tiny, ~125M) and recipe, a fresh Llama is built and converted, then
``--warmup`` untimed and ``--steps`` timed training steps (forward, backward, clip, optimizer step)
run on random token batches (throughput does not depend on the text). Step times give
p20 / p50 / p80; tokens/s = batch x seq_len / p50. On CPU the quantized recipes are emulated
(quantize, dequantize, fp32 GEMM), so the ratio to bf16 is the emulation's cost, not a speed-up.

With a GPU, each recipe also runs under a one-rank DeepSpeed engine with ZeRO 1 and ZeRO 3 and
reports the peak GPU memory.

    python -m lowbit.bench.train [--configs tiny 125m] [--recipes bf16 nvfp4 ...] [--steps 3]
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {  # config file, micro-batch and sequence length used on CPU (the 125M step is kept short)
    "tiny": ("configs/pretrain/tiny.yaml", 16, 128),
    "125m": ("configs/pretrain/125m.yaml", 1, 256),
}
FIELDS = ["machine", "device", "config", "recipe", "zero_stage", "parameters", "batch", "seq_len", "step_p20_s",
          "step_p50_s", "step_p80_s", "tokens_per_s", "ratio_to_bf16", "peak_memory_gib", "note"]


def _percentile(xs, q):
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def machine_name(device: str) -> str:
    """The shared harness's machine name (lowbit.bench.harness, or bench/harness.py in a checkout)."""
    try:
        from .harness import machine_name as name
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_bench_harness", os.path.join(REPO, "bench", "harness.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        name = mod.machine_name
    return name(device)


def _config(name: str, recipe: str, batch: int, seq: int, zero: int | None):
    from ..train import load

    path, _, _ = CONFIGS[name]
    over = [f"quant.recipe={recipe}", f"train.micro_batch_size={batch}", f"data.seq_len={seq}", "optim.name=adamw"]
    if zero is not None:
        over += ["dist.engine=deepspeed", f"dist.zero_stage={zero}"]
    return load([os.path.join(REPO, path)], over)


def time_steps(cfg, device: torch.device, warmup: int, steps: int, zero: int | None) -> dict:
    from ..train import dist as D, losses, model as model_mod, optim as optim_mod

    model = model_mod.build(cfg, cfg.data.vocab_size, {"eos": 0, "pad": 1, "bos": 0}).to(device)
    n_params = model_mod.count_parameters(model)
    opt = optim_mod.build(model.parameters(), cfg)
    sched = optim_mod.scheduler(opt, cfg)
    env = None
    if zero is not None:
        env = D.setup(cfg)
        engine, opt, sched = D.wrap(model, opt, sched, cfg, env, cfg.train.micro_batch_size, 1)
    else:
        engine = model
    g = torch.Generator().manual_seed(0)
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    batch = {"input_ids": torch.randint(0, cfg.data.vocab_size, (b, t), generator=g).to(device)}
    batch["labels"] = batch["input_ids"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _, _ = losses.token_loss(engine, batch, cfg.objective, "nll")
        if zero is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    if env is not None:
        D.teardown(env)
    p50 = _percentile(times, 50)
    return {"parameters": n_params, "batch": b, "seq_len": t, "step_p20_s": _percentile(times, 20), "step_p50_s": p50,
            "step_p80_s": _percentile(times, 80), "tokens_per_s": b * t / p50, "peak_memory_gib": peak}


def run(configs, recipes, steps: int, warmup: int, out: str | None) -> list[dict]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    machine = machine_name(device.type)
    zeros = [None] + ([1, 3] if device.type == "cuda" else [])
    rows = []
    for name in configs:
        _, b, t = CONFIGS[name]
        if device.type == "cuda":
            b, t = b * 4, 1024
        for zero in zeros:
            base = None
            for recipe in (["bf16"] + [r for r in recipes if r != "bf16"]):
                cfg = _config(name, recipe, b, t, zero)
                try:
                    r = time_steps(cfg, device, warmup, steps, zero)
                    note = ""
                except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. a recipe the device lacks
                    r, note = {"parameters": None, "batch": b, "seq_len": t}, f"failed: {str(e).splitlines()[0][:120]}"
                if recipe == "bf16":
                    base = r.get("tokens_per_s")
                ratio = r["tokens_per_s"] / base if base and r.get("tokens_per_s") else None
                row = {"machine": machine, "device": device.type, "config": name, "recipe": recipe,
                       "zero_stage": zero, **r, "ratio_to_bf16": ratio, "note": note}
                rows.append(row)
                print(f"{name:<5} {recipe:<15} zero={zero} "
                      + (f"{row['tokens_per_s']:>9.0f} tok/s  p50 {row['step_p50_s']:.3f} s  x{ratio:.2f} of bf16"
                         if ratio else note), flush=True)
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..nn import RECIPE_NAMES

    p = argparse.ArgumentParser(prog="lowbit bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPE_NAMES), choices=list(RECIPE_NAMES))
    p.add_argument("--steps", type=int, default=5, help="timed steps per recipe (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="CSV path (default bench/results/<machine>/train.csv)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or os.path.join(REPO, "bench", "results", machine_name(device), "train.csv")
    run(args.configs, args.recipes, args.steps, args.warmup, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
