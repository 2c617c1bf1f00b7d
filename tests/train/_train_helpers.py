"""Helpers for tests/train: a very small model on a small slice of the embedded corpus, run in-process or via the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "pretrain", "tiny.yaml")
# ~0.2M parameters: keeps every multi-step test within a few seconds on 2 cores.
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128",
         "data.vocab_size=512", "data.seq_len=32", "data.max_corpus_mb=0.3", "train.micro_batch_size=4",
         "train.eval_batches=2", "train.eval_every=0", "train.checkpoint_every=0", "optim.warmup_steps=2",
         "run.progress=false", "run.tensorboard=false"]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def lowbit_cli(args: list[str], *, timeout: float = 240, launcher: list[str] | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "lowbit"] + args
    return subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: str, kind: str = "train") -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}
