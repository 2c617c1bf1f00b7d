"""`python -m lowbit.demo` (`make demo`): pretrain the tiny model on the embedded corpus in NVFP4.

Runs `lowbit pretrain --config configs/pretrain/tiny.yaml` with the `nvfp4` recipe and Stable-SPAM
on the Python standard library source (BPE tokenizer trained and cached on first use), short enough
for a few minutes on 2 CPU cores, then prints the validation perplexity and where the metrics are.
Extra ``key=value`` arguments override the config (e.g. ``train.steps=100``).

``--table`` instead prints the backend report and a table of quantization error per format and
rounding mode: a 1024 x 1024 sample is quantized and dequantized; the table shows the SQNR (10 log10
of signal power over error power, higher is better), the largest absolute error, and the backend
that ran it, on N(0, 1) and heavy-tailed Student-t (df = 3) samples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import backends, env
from .cli import main as cli_main
from .ops import dequantize, quantize

CASES = [
    ("fp8_e4m3", None, "per tensor"),
    ("fp8_e4m3", (1, 128), "1x128"),
    ("fp8_e5m2", None, "per tensor"),
    ("mxfp8", None, "1x32, E8M0"),
    ("mxfp8_e5m2", None, "1x32, E8M0"),
    ("mxfp4", None, "1x32, E8M0"),
    ("nvfp4", None, "1x16, E4M3 + fp32"),
    ("nvfp4", (16, 16), "16x16, E4M3 + fp32"),
]


def samples(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, n, generator=g)
    chi2 = torch.distributions.Chi2(torch.tensor(3.0))
    torch.manual_seed(seed)
    student = torch.randn(n, n, generator=g) / torch.sqrt(chi2.sample((n, n)) / 3.0)
    return {"N(0,1)": normal, "Student-t(3)": student}


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    noise = ((x - y) ** 2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10((x * x).sum() / noise))


def table(x: torch.Tensor, backend: str | None) -> list[tuple]:
    rows = []
    for name, block, layout in CASES:
        for rounding in ("nearest", "stochastic"):
            used = backend or backends.resolve("quantize", x.device.type)
            q = quantize(x, name, block=block, rounding=rounding, seed=0, backend=backend)
            d = dequantize(q, torch.float32, backend=backend)
            err = (d - x).abs().max().item()
            rows.append((name, layout, rounding, sqnr_db(x, d), err, used))
    return rows


DEMO_OVERRIDES = ["quant.recipe=nvfp4", "optim.name=stable_spam", "optim.lr=3e-3", "optim.warmup_steps=5",
                  "train.steps=40", "train.micro_batch_size=8", "train.eval_every=0", "train.eval_batches=4",
                  "train.checkpoint_every=0", "run.dir=runs/demo", "run.resume=never",
                  "run.overwrite=true"]


def pretrain_demo(extra: list[str]) -> int:
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain", "tiny.yaml")
    t0 = time.time()
    code = cli_main(["pretrain", "--config", config] + DEMO_OVERRIDES + list(extra))
    if code == 0:
        with open(os.path.join(_run_dir(extra), "summary.json")) as f:
            s = json.load(f)
        print(f"\ndemo: {s['parameters'] / 1e6:.1f} M-parameter Llama, recipe {s['recipe']}, optimizer {s['optimizer']}, "
              f"{s['steps']} steps on {s['data']}")
        print(f"demo: validation perplexity {s['val_ppl']:.1f} (loss {s['val_loss']:.4f}) after {time.time() - t0:.0f} s")
        print(f"demo: metrics in {s['metrics']}; TensorBoard: tensorboard --logdir {s['tensorboard']}")
    return code


def _run_dir(extra: list[str]) -> str:
    dirs = [a.split("=", 1)[1] for a in DEMO_OVERRIDES + list(extra) if a.startswith("run.dir=")]
    return dirs[-1]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--table" not in argv:
        sys.exit(pretrain_demo(argv))
    argv.remove("--table")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="the sample is size x size (default 1024)")
    p.add_argument("--backend", default=None, choices=list(backends.NAMES), help="default: automatic choice")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size % 128:
        p.error("--size: expected a multiple of 128 (the largest block here)")

    print(env.report())
    for label, x in samples(args.size, args.seed).items():
        print(f"\nquantize -> dequantize of a {args.size}x{args.size} {label} sample "
              f"(amax {x.abs().max().item():.3g})")
        head = f"{'format':<11} {'scales':<19} {'rounding':<10} {'SQNR dB':>8} {'max |err|':>10}  {'backend':<8}"
        print(head)
        print("-" * len(head))
        for name, layout, rounding, db, err, used in table(x, args.backend):
            print(f"{name:<11} {layout:<19} {rounding:<10} {db:>8.2f} {err:>10.4g}  {used}")
    print("\nSQNR = 10 log10(sum x^2 / sum (x - dequantize(quantize(x)))^2), higher is better. MX scales use the "
          "OCP floor rule,\nso a block whose amax has a large mantissa saturates (the max |err| of MXFP8 above). "
          "The rules are in lowbit/backends/ref/quantize.py.")


if __name__ == "__main__":
    main()
