"""The `lowbit` command: pretrain | sft | align | eval | env, and seer | bench | report.

    lowbit pretrain --config configs/pretrain/tiny.yaml train.steps=100 quant.recipe=nvfp4
    deepspeed --num_gpus 2 -m lowbit pretrain --config ... dist.zero_stage=2
    torchrun --nproc_per_node 2 -m lowbit sft --config configs/sft/tiny.yaml model.init_from=runs/pretrain-nvfp4
    lowbit eval --checkpoint runs/pretrain-nvfp4
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys

TRAIN_TASKS = {
    "pretrain": "pretrain a causal LM (default: ~5M-parameter Llama on the embedded stdlib corpus)",
    "sft": "supervised fine-tuning (JSONL chat / prompt-response data or the built-in synthetic task)",
    "align": "preference alignment: DPO / f-DPO or KLDO",
}
DELEGATED = {"seer": "lowbit.attention.cli", "bench": "lowbit.bench.cli", "report": "lowbit.report.cli"}


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher inserts --local_rank=N; the rank comes from the environment instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", a):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def _keys_help() -> str:
    from .train.config import describe

    rows = describe()
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    return "config keys (key=value overrides; defaults shown):\n" + "\n".join(
        f"  {f'{k} = {v}':<{width}} {h}" for k, v, h in rows if k != "task")


def _train_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"lowbit {task}", description=TRAIN_TASKS[task], epilog=_keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file (repeatable; later files override earlier ones)")
    if task == "sft":
        p.add_argument("--objective", default=None,
                       help="shorthand for objective.name (auto: measure the prior strength and pick)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    return p


def _train(task: str, argv: list[str]) -> int:
    from .train import ConfigError, load, run

    args = _train_parser(task).parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "objective", None):
        overrides.append(f"objective.name={args.objective}")
    try:
        cfg = load(args.config, overrides, task=task)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lowbit {task}: {e}", file=sys.stderr)
        return 2
    summary = run(cfg)
    if summary.get("world_size", 1) == 1 or _rank() == 0:
        _print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))


def _print_summary(s: dict) -> None:
    print("\nsummary:")
    for k in ("task", "status", "message", "steps", "recipe", "optimizer", "objective", "engine", "world_size",
              "parameters", "train_loss", "val_loss", "val_ppl", "val_exact_match", "val_reward_accuracy",
              "tokens_per_s", "skipped_steps", "loss_spikes", "wall_time_s"):
        v = s.get(k)
        if v is not None:
            print(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    print(f"  metrics              {s['metrics']}")
    if s.get("tensorboard"):
        print(f"  tensorboard          {s['tensorboard']}")
    print(f"  checkpoint           {s['checkpoint']}")
    if s.get("hf_export"):
        print(f"  hf export            {s['hf_export']}")
    print(f"  summary              {s['run_dir']}/summary.json")


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lowbit eval", description="held-out perplexity and exact-match accuracy on "
                                "the built-in SFT task, for a run dir, a lowbit checkpoint or an HF export")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step_* dir or HF export dir")
    p.add_argument("--batches", type=int, default=16, help="validation batches (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--attention", choices=["dense", "seer"], default="dense",
                   help="seer: apply SeerAttention gates (lowbit.attention.apply_seer)")
    p.add_argument("--gates", default=None, help="gate weights for --attention seer")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides of the checkpoint's config")
    args = p.parse_intermixed_args(argv)
    from .train.eval_cli import evaluate_checkpoint

    try:
        res = evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"lowbit eval: {e}", file=sys.stderr)
        return 2
    for k, v in res.items():
        print(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _delegate(name: str, argv: list[str]) -> int:
    module = DELEGATED[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"lowbit {name}: {module} is not available in this installation ({e})", file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv) or 0)


def _usage() -> str:
    lines = ["usage: lowbit <command> [args]   (lowbit <command> --help for details)", "", "commands:"]
    for k, v in TRAIN_TASKS.items():
        lines.append(f"  {k:<9} {v}")
    lines += ["  eval      held-out perplexity / SFT accuracy of a checkpoint",
              "  env       which backend serves each op, and why",
              "  seer      SeerAttention gates (lowbit.attention)",
              "  bench     benchmarks (lowbit.bench)",
              "  report    convergence reports (lowbit.report)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in TRAIN_TASKS:
        return _train(cmd, rest)
    if cmd == "eval":
        return _eval(rest)
    if cmd == "env":
        from .env import report
        print(report())
        return 0
    if cmd in DELEGATED:
        return _delegate(cmd, rest)
    print(f"lowbit: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
