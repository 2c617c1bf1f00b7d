"""`lowbit pretrain | sft | align --config YAML [key=value ...]`: train, then print the summary."""
from __future__ import annotations

import argparse
import sys

from .. import launcher
from .config import ConfigError, describe, load
from .loop import run

TASKS = {
    "pretrain": "pretrain a causal LM (default: ~5M-parameter Llama on the embedded stdlib corpus)",
    "sft": "supervised fine-tuning (JSONL chat / prompt-response data or the built-in synthetic task)",
    "align": "preference alignment: DPO / f-DPO or KLDO",
}
SUMMARY_KEYS = ("task", "status", "message", "steps", "recipe", "optimizer", "objective", "engine", "world_size",
                "parameters", "train_loss", "val_loss", "val_ppl", "val_exact_match", "val_reward_accuracy",
                "tokens_per_s", "skipped_steps", "loss_spikes", "wall_time_s")


def keys_help() -> str:
    rows = describe()
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    return "config keys (key=value overrides; defaults shown):\n" + "\n".join(
        f"  {f'{k} = {v}':<{width}} {h}" for k, v, h in rows if k != "task")


def parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"lowbit {task}", description=TASKS[task], epilog=keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file (repeatable; later files override earlier ones)")
    if task == "sft":
        p.add_argument("--objective", default=None,
                       help="shorthand for objective.name (auto: measure the prior strength and pick)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    return p


def train(task: str, argv: list[str]) -> int:
    args = parser(task).parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "objective", None):
        overrides.append(f"objective.name={args.objective}")
    try:
        cfg = load(args.config, overrides, task=task)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lowbit {task}: {e}", file=sys.stderr)
        return 2
    summary = run(cfg)
    if launcher.ranks()[0] == 0:
        print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def pretrain(argv: list[str]) -> int:
    return train("pretrain", argv)


def sft(argv: list[str]) -> int:
    return train("sft", argv)


def align(argv: list[str]) -> int:
    return train("align", argv)


def print_summary(s: dict) -> None:
    print("\nsummary:")
    for k in SUMMARY_KEYS:
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
