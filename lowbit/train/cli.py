"""`lowbit pretrain | sft | align --config YAML [key=value ...]`: train, then print the summary."""
from __future__ import annotations

import argparse
import sys

from .. import launcher
from . import safety
from .config import ConfigError, describe, load
from .loop import run

TASKS = {
    "pretrain": "pretrain a causal LM (default: ~5M-parameter Llama on the embedded stdlib corpus)",
    "sft": "supervised fine-tuning (JSONL chat / prompt-response data or the built-in synthetic task)",
    "align": "alignment: DPO / f-DPO on preference pairs; KLDO, KTO or BCO on labelled prompt / response data",
}
SUMMARY_KEYS = ("task", "status", "message", "steps", "recipe", "optimizer", "objective", "engine", "world_size",
                "parameters", "train_loss", "val_loss", "val_ppl", "val_exact_match", "val_reward_accuracy",
                "tokens_per_s", "skipped_steps", "loss_spikes", "wall_time_s")


OBJECTIVE_HELP = (
    "shorthand for objective.name: nll, neg_p, f_alpha, threshold, top_fraction, bottom_fraction, the keys of "
    "the paper's code (original, p, GeneralFamily-<alpha>, OnlyTopP-<q>, OnlyBottomP-<q>, OnlyTopLogP-<q>, "
    "OnlyBottomLogP-<q>), or auto. auto measures the starting model's mean probability m of the training "
    "targets (lowbit.objectives.prior_strength) and picks by the model-capability continuum of 'Beyond Log "
    "Likelihood' (Li et al. 2025, arXiv:2510.00526, Fig. 1): m >= 0.5 (model-strong) -> neg_p (-p); m <= 0.2 "
    "(model-weak) -> nll; in between -> GeneralFamily-<a>, (1 - p^a) / a with a = (m - 0.2) / 0.3, from NLL "
    "to -p. The paper places tasks qualitatively; the cut-points 0.5 and 0.2 are lowbit's defaults")


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
        p.add_argument("--objective", default=None, help=OBJECTIVE_HELP)
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
    for when in ("initial", "final"):
        if s.get(f"separation_{when}"):
            print(f"  {'separation ' + when:<20} {safety.brief(s[f'separation_{when}'])}")
    print(f"  metrics              {s['metrics']}")
    if s.get("tensorboard"):
        print(f"  tensorboard          {s['tensorboard']}")
    print(f"  checkpoint           {s['checkpoint']}")
    if s.get("hf_export"):
        print(f"  hf export            {s['hf_export']}")
    print(f"  summary              {s['run_dir']}/summary.json")
