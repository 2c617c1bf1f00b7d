"""`lowbit report convergence [--arms ladder optim sft] [--steps N] ... [key=value ...]`."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from ..nn.recipe import RECIPE_NAMES
from ..objectives import parse_objective
from . import arms as A
from .convergence import report
from .spikes import SpikePlan
from .variants import VARIANTS

SMOKE = dict(steps=5, sft_steps=5, baseline_seeds=2, hidden=64, layers=2, heads=2, intermediate=128, seq_len=32,
             batch=4, eval_batches=1, evals=1, sft_examples=32, sft_val_examples=8,
             spikes=SpikePlan(start=2, every=2))


def recipe_names() -> list[str]:
    return list(RECIPE_NAMES) + list(VARIANTS)


def objective_name(name: str) -> str:
    """An objective the runs can use as objective.name alone (f_alpha / *_fraction need a value as well)."""
    try:
        parse_objective(name)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def parser() -> argparse.ArgumentParser:
    d = A.Settings()
    p = argparse.ArgumentParser(prog="lowbit report", description="evidence reports; `convergence`: recipe ladder, "
                                "4-bit optimizer stability and SFT objectives on a tiny model; `continual`: "
                                "forgetting with AdamW, EWC and CLASSP (its own options: lowbit report continual --help)")
    p.add_argument("report", choices=["convergence", "continual"])
    p.add_argument("--arms", nargs="+", choices=A.ARMS, default=list(A.ARMS))
    p.add_argument("--recipes", nargs="+", default=list(A.LADDER), choices=recipe_names(),
                   help="ladder arm recipes (bf16 is the baseline)")
    p.add_argument("--optimizers", nargs="+", default=list(A.OPTIMIZERS), choices=A.OPTIMIZERS)
    p.add_argument("--objectives", nargs="+", default=list(A.OBJECTIVES), type=objective_name,
                   help="SFT objectives that need no hyper-parameter: nll, neg_p, threshold, or the paper's keys "
                        "original, p, GeneralFamily-<alpha>, OnlyTopP-<q>, OnlyBottomP-<q>, OnlyTopLogP-<q>, "
                        "OnlyBottomLogP-<q>")
    p.add_argument("--steps", type=int, default=d.steps, help=f"pretraining steps per run (default {d.steps})")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps, help=f"SFT steps per run (default {d.sft_steps})")
    p.add_argument("--seeds", type=int, default=d.baseline_seeds,
                   help=f"seeds of the bf16 baseline: the noise band (default {d.baseline_seeds})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every non-baseline run (default 0)")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--sigma", type=float, default=2.0, help="gaps inside this many baseline sigmas are ties")
    p.add_argument("--out", default=None, help="report folder (default reports/convergence; --smoke: <work>/smoke)")
    p.add_argument("--work", default="runs/report-convergence", help="where the runs are kept")
    p.add_argument("--smoke", action="store_true", help="5 steps on a micro model: checks every arm end to end")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="lowbit.train overrides applied to every run")
    return p


def settings_of(args) -> A.Settings:
    s = A.Settings(steps=args.steps, sft_steps=args.sft_steps, baseline_seeds=args.seeds, seed=args.seed,
                   hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
                   seq_len=args.seq_len, batch=args.batch, lr=args.lr, overrides=tuple(args.overrides),
                   recipes=tuple(args.recipes), optimizers=tuple(args.optimizers), objectives=tuple(args.objectives))
    return dataclasses.replace(s, **SMOKE) if args.smoke else s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["continual"]:  # a report with options of its own
        from .continual_report import main as continual
        return continual(argv[1:])
    args = parser().parse_intermixed_args(argv)
    s = settings_of(args)
    work = f"{args.work}/smoke" if args.smoke else args.work
    out = args.out or (f"{work}/report" if args.smoke else "reports/convergence")
    command = "lowbit report " + " ".join(shlex.quote(a) for a in argv)
    report(s, tuple(args.arms), work, out, command, k=args.sigma)
    return 0


if __name__ == "__main__":
    sys.exit(main())
