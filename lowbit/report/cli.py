"""`lowbit report convergence [--preset resolve|fourbit] [--arms ...] [--steps N] ... [key=value ...]`."""
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
             spikes=SpikePlan(start=2, every=2), wgrad_draws=2)


# Named settings; explicit flags still override them.
PRESETS = {
    # sized to resolve gaps of 1-2 % (a 3.7 M-parameter model, 300 steps of 16 x 128 tokens; 5 bf16 seeds
    # for the noise band): the recipe ladder, MXFP4 / INT4 / NVFP4 with AdamW and Stable-SPAM over 2 seeds,
    # the bf16 Stable-SPAM control and the merge arm
    "resolve": dict(arms=["ladder", "optim", "merge"], hidden=256, layers=4, heads=4, intermediate=512, seq_len=128,
                    batch=16, steps=300, warmup=30, eval_batches=32, evals=6, seeds=5, recipe_seeds=1, optim_seeds=2,
                    conditions=["clean"], cells=["mxfp4:adamw", "mxfp4:stable_spam", "int4:adamw", "int4:stable_spam",
                                                 "nvfp4:adamw", "bf16:stable_spam"],
                    work="runs/report-resolve", out="reports/convergence"),
    # the shape of Stable-SPAM's 4-bit table at CPU scale: BF16 Adam, INT4 and MXFP4 with Adam, SPAM and
    # Stable-SPAM, 2 seeds each, clean and with injected spikes (2.4 M parameters, 200 steps of 16 x 64;
    # hidden and MLP widths are multiples of 256, the official INT4 group)
    "fourbit": dict(arms=["ladder", "optim"], recipes=["bf16"], hidden=256, layers=2, heads=4, intermediate=512,
                    seq_len=64, batch=16, steps=200, warmup=20, eval_batches=16, evals=4, seeds=3, optim_seeds=2,
                    conditions=["clean", "spikes"],
                    cells=["bf16:adamw"] + [f"{r}:{o}" for r in ("int4", "mxfp4") for o in A.OPTIMIZERS],
                    work="runs/report-fourbit", out="reports/fourbit-optimizers"),
}


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
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="resolve: sized to resolve gaps of 1-2 %% (22 runs, about an hour on 2 CPU cores), committed as "
                        "reports/convergence; fourbit: Stable-SPAM's 4-bit optimizer table (29 small runs), committed "
                        "as reports/fourbit-optimizers. Flags given as well override the preset")
    p.add_argument("--arms", nargs="+", choices=A.ARMS, default=list(A.DEFAULT_ARMS))
    p.add_argument("--recipes", nargs="+", default=list(A.LADDER), choices=recipe_names(),
                   help="ladder arm recipes (bf16 is the baseline)")
    p.add_argument("--recipe-seeds", type=int, default=d.recipe_seeds, help="seeds of each non-baseline ladder recipe")
    p.add_argument("--optimizers", nargs="+", default=list(A.OPTIMIZERS), choices=A.OPTIMIZERS,
                   help=f"optim arm: {A.OPTIM_RECIPE} with these (when --cells is not given)")
    p.add_argument("--cells", nargs="+", default=[], metavar="RECIPE:OPTIMIZER", help="optim arm cells, e.g. int4:spam")
    p.add_argument("--optim-seeds", type=int, default=d.optim_seeds, help="seeds of each optim arm cell")
    p.add_argument("--conditions", nargs="+", default=list(A.CONDITIONS), choices=A.CONDITIONS,
                   help="optim arm: clean and / or with injected gradient spikes")
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
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--evals", type=int, default=d.evals, help="validation points per run")
    p.add_argument("--sigma", type=float, default=2.0, help="gaps inside this many baseline sigmas are ties")
    p.add_argument("--out", default=None, help="report folder (default reports/convergence; --smoke: <work>/smoke)")
    p.add_argument("--work", default="runs/report-convergence", help="where the runs are kept")
    p.add_argument("--smoke", action="store_true", help="5 steps on a micro model: checks every arm end to end")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="lowbit.train overrides applied to every run")
    return p


def settings_of(args) -> A.Settings:
    s = A.Settings(steps=args.steps, sft_steps=args.sft_steps, baseline_seeds=args.seeds, seed=args.seed,
                   hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
                   seq_len=args.seq_len, batch=args.batch, lr=args.lr, warmup=args.warmup, eval_batches=args.eval_batches,
                   evals=args.evals, overrides=tuple(args.overrides), recipes=tuple(args.recipes),
                   recipe_seeds=args.recipe_seeds, optimizers=tuple(args.optimizers), cells=tuple(args.cells),
                   optim_seeds=args.optim_seeds, conditions=tuple(args.conditions), objectives=tuple(args.objectives))
    return dataclasses.replace(s, **SMOKE) if args.smoke else s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["continual"]:  # a report with options of its own
        from .continual_report import main as continual
        return continual(argv[1:])
    p = parser()
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_intermixed_args(argv)
    s = settings_of(args)
    work = f"{args.work}/smoke" if args.smoke else args.work
    if args.smoke:  # a smoke run never writes over a committed report, a preset's folder included
        out = args.out if args.out and not preset else f"{work}/report"
    else:
        out = args.out or "reports/convergence"
    command = "lowbit report " + " ".join(shlex.quote(a) for a in argv)
    report(s, tuple(args.arms), work, out, command, k=args.sigma)
    return 0


if __name__ == "__main__":
    sys.exit(main())
