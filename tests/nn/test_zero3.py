"""Quantized layers under DeepSpeed ZeRO-3 (parameters partitioned across 2 CPU ranks, gloo).

ZeRO-3 gathers each LowBitLinear's weight right before its forward and frees it after; the layer
must quantize the gathered weight (never a stale or partial one). With a deterministic recipe
(mxfp8: round-to-nearest everywhere) 2 ranks x 4 sequences must give the losses of one process
with 8, step for step.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ARGS = ["pretrain", "--config", os.path.join(REPO, "configs", "pretrain", "tiny.yaml"), "quant.recipe=mxfp8",
        "optim.name=stable_spam", "train.steps=5", "train.global_batch_size=8", "train.micro_batch_size=4",
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128",
        "data.vocab_size=512", "data.seq_len=32", "data.max_corpus_mb=0.3", "train.eval_batches=2",
        "train.eval_every=0", "train.checkpoint_every=0", "optim.warmup_steps=2", "run.progress=false",
        "run.tensorboard=false"]


def run(cmd, tmp, name, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    d = str(tmp / name)
    proc = subprocess.run(cmd + ARGS + list(extra) + [f"run.dir={d}", f"data.cache_dir={tmp / 'cache'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


@pytest.mark.slow
def test_mxfp8_under_zero3_matches_one_process(tmp_path):
    if shutil.which(TORCHRUN) is None:
        pytest.skip("torchrun is not installed")
    single = run([sys.executable, "-m", "lowbit"], tmp_path, "single")
    zero3 = run([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29657", "-m", "lowbit"], tmp_path, "zero3",
                ["dist.zero_stage=3", "dist.engine=deepspeed"])
    assert sorted(zero3) == list(range(1, 6)) and single[5] < single[1]
    for step, loss in single.items():
        assert zero3[step] == pytest.approx(loss, rel=1e-6), (step, single, zero3)
