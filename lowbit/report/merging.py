"""The merge arm: a constant-learning-rate run whose last checkpoints are merged with WSM's weights,
against the cosine-decay runs of the ladder at the same token budget (Tian et al., 2025).

Every model is scored by `lowbit eval`'s code on the same validation batches as the training runs,
so the merged weights, the constant-LR run's final weights and the cosine run's final weights are
compared on one footing (the cosine run's score is also its training summary's final val loss).
"""
from __future__ import annotations

import os

from ..train import eval_cli
from ..train.merge import merge
from .arms import Settings


def score(checkpoint: str, s: Settings) -> float:
    """Held-out loss of a run dir or checkpoint folder over the report's validation batches."""
    args = eval_cli.parser().parse_args(["--checkpoint", checkpoint, "--batches", str(s.eval_batches),
                                         "--batch-size", str(s.batch)])
    return float(eval_cli.evaluate_checkpoint(args)["val_loss"])


def evaluate(run_dir: str, cosine_dirs: list[str], s: Settings, say=print) -> dict:
    """Merge the constant-LR run's last `s.merge_last` checkpoints (WSM, cosine decay) and score it all."""
    out = run_dir.rstrip(os.sep) + "-wsm"
    info = merge(run_dir, s.merge_last, out, weights="wsm", decay="cosine", overwrite=True, export_hf=False)
    steps = [c["step"] for c in info["checkpoints"]]
    say(f"  merged steps {steps} -> {out}")
    return {"merged": score(out, s), "constant_final": score(run_dir, s),
            "cosine_final": {os.path.basename(d): score(d, s) for d in cosine_dirs},
            "steps": steps, "weights": [c["weight"] for c in info["checkpoints"]]}
