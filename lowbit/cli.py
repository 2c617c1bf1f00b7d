"""The `lowbit` command: pretrain | sft | align | eval | seer (lowbit.train), env, bench, report.

    lowbit pretrain --config configs/pretrain/tiny.yaml train.steps=100 quant.recipe=nvfp4
    deepspeed --num_gpus 2 -m lowbit pretrain --config ... dist.zero_stage=2
    torchrun --nproc_per_node 2 -m lowbit sft --config configs/sft/tiny.yaml model.init_from=runs/pretrain-nvfp4
    lowbit eval --checkpoint runs/pretrain-nvfp4
    lowbit seer distill configs/seer/tiny.yaml
"""
from __future__ import annotations

import importlib
import sys

from . import env, errors
from .launcher import strip_launcher_args

# command -> ("module:function" that takes the remaining arguments, help line). A command's module is
# imported only when it runs: the training stack needs omegaconf and transformers, which
# `lowbit env` and `lowbit bench` do not, and every command starts without importing the others.
COMMANDS = {
    "pretrain": ("lowbit.train.cli:pretrain", "pretrain a causal LM"),
    "sft": ("lowbit.train.cli:sft", "supervised fine-tuning"),
    "align": ("lowbit.train.cli:align", "alignment: DPO / f-DPO, KLDO, KTO or BCO"),
    "eval": ("lowbit.train.eval_cli:main", "held-out perplexity / SFT accuracy of a checkpoint"),
    "env": (None, "which backend serves each op, and why"),
    "seer": ("lowbit.train.seer:main", "SeerAttention gates: distill | eval (lowbit.attention)"),
    "bench": ("lowbit.bench.cli:main", "benchmarks (lowbit.bench)"),
    "report": ("lowbit.report.cli:main", "convergence reports (lowbit.report)"),
    "verify": ("lowbit.train.rundir:main", "check every checkpoint of a run against its manifest"),
    "merge": ("lowbit.train.merge:main", "average a run's last N checkpoints (uniform / WSM) into a checkpoint + HF export"),
}


def usage() -> str:
    lines = ["usage: lowbit [--debug] <command> [args]   (lowbit <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<9} {help_line}" for name, (_, help_line) in COMMANDS.items()]
    lines += ["", "--debug (or LOWBIT_DEBUG=1): show the traceback of an expected error, not only its one line"]
    return "\n".join(lines)


def _dispatch(name: str, argv: list[str], debug: bool = False) -> int:
    module, _, function = COMMANDS[name][0].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"lowbit {name}: {module} is not available in this installation ({e})", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(mod, function)(argv) or 0)
    except Exception as e:
        # a mistake in the user's input is one line and exit 2; a bug keeps its traceback
        if debug or not errors.expected(e):
            raise
        print(f"lowbit {name}: {errors.describe(e)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv or errors.debug()
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        print(env.report())
        return 0
    if cmd in COMMANDS:
        return _dispatch(cmd, rest, debug)
    print(f"lowbit: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
