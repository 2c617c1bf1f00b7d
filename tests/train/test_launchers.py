"""`torchrun --nproc_per_node 2` and `deepspeed --num_gpus 2` on CPU (gloo): every ZeRO stage, and DDP,
match the single-process run with the same global batch (8 sequences: 2 ranks x 4, or 1 x 4 x 2 micro-batches).

Stable-SPAM is the optimizer, so ZeRO 1-3 also check its per-tensor statistics over partitions
(lowbit.optim.zero). The two launchers split the stages between them to keep the suite short:
torchrun runs ZeRO 0 and 3 and plain DDP, the deepspeed launcher ZeRO 1 and 2.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from _train_helpers import SMALL, TINY, child_env, losses, lowbit_cli

STEPS = 5
ARGS = ["pretrain", "--config", TINY, f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "optim.name=stable_spam"]
BUDGET_S = 240
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    d = str(tmp_path_factory.mktemp("single"))
    proc = lowbit_cli(ARGS + SMALL + [f"run.dir={d}", f"data.cache_dir={cache_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


# the deepspeed launcher spells "run a module" --module; torchrun takes python's -m
LAUNCH = {
    "torchrun": [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", "29611", "-m", "lowbit"],
    "deepspeed": [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29612", "--module", "lowbit"],
}


@pytest.mark.parametrize("launcher,stage,engine", [("torchrun", 0, "deepspeed"), ("torchrun", 3, "deepspeed"),
                                                   ("deepspeed", 1, "deepspeed"), ("deepspeed", 2, "deepspeed"),
                                                   ("torchrun", 0, "torch")])
def test_two_ranks_match_single_process(launcher, stage, engine, single, tmp_path, cache_dir):
    if shutil.which(LAUNCH[launcher][0]) is None:
        pytest.skip(f"{launcher} is not installed")
    d = str(tmp_path / "run")
    t0 = time.time()
    proc = subprocess.run(LAUNCH[launcher] + ARGS + SMALL + [f"run.dir={d}", f"data.cache_dir={cache_dir}",
                                                  f"dist.zero_stage={stage}", f"dist.engine={engine}"],
                          env=child_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=BUDGET_S + 60)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < BUDGET_S, f"{launcher} ZeRO-{stage} took {wall:.0f} s"
    s = json.load(open(os.path.join(d, "summary.json")))
    assert s["world_size"] == 2 and s["engine"] == engine
    ref, got = losses(single), losses(d)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, ref, got)
    ref_s = json.load(open(os.path.join(single, "summary.json")))
    assert s["val_loss"] == pytest.approx(ref_s["val_loss"], rel=1e-5)
    assert ref[STEPS] < ref[1]  # the runs compared actually trained
