"""Resume: SIGKILL at a random step + resume=auto gives the same loss curve bit for bit; a crash while a
checkpoint is being written leaves the previous checkpoint as the newest usable one."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from _train_helpers import REPO, SMALL, TINY, child_env, losses

import lowbit.train.checkpoint as ckpt_mod
from lowbit.train import load, run

STEPS = 12


def _args(run_dir, cache_dir):
    # Stable-SPAM with a short reset interval, so its statistics and reset counter must round-trip too
    return ["pretrain", "--config", TINY, f"train.steps={STEPS}", "train.checkpoint_every=2",
            f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "optim.name=stable_spam",
            "optim.args.reset_interval=5", "train.keep_checkpoints=3"] + SMALL + ["train.checkpoint_every=2"]


def _last_step(path):
    try:
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max((r["step"] for r in rows if r.get("kind") == "train"), default=0)


def test_sigkill_resume_is_bit_exact(tmp_path, cache_dir):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    cmd = [sys.executable, "-m", "lowbit"]
    done = subprocess.run(cmd + _args(ref, cache_dir), cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    kill_at = random.Random().randint(3, STEPS - 2)
    proc = subprocess.Popen(cmd + _args(cut, cache_dir), cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _last_step(os.path.join(cut, "metrics.jsonl")) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(os.path.join(cut, "metrics.jsonl"))
    assert killed_at < STEPS and not os.path.exists(os.path.join(cut, "summary.json")), "the run finished before the kill"

    resumed = subprocess.run(cmd + _args(cut, cache_dir), cwd=REPO, env=child_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = losses(ref), losses(cut)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert a == b, f"killed after step {killed_at}: curves differ at steps {[s for s in a if a[s] != b.get(s)]}"
    wa = torch.load(os.path.join(ref, "checkpoints", f"step_{STEPS:08d}", "model.pt"), weights_only=True)
    wb = torch.load(os.path.join(cut, "checkpoints", f"step_{STEPS:08d}", "model.pt"), weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.load(open(os.path.join(cut, "summary.json")))
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] <= killed_at


def test_checkpoint_files_load_weights_only(tmp_path, cache_dir):
    cfg = load([TINY], SMALL + ["train.steps=2", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                                "optim.name=stable_spam"])
    run(cfg)
    files = glob.glob(os.path.join(str(tmp_path), "checkpoints", "step_*", "**", "*.pt"), recursive=True)
    assert {os.path.basename(f) for f in files} >= {"model.pt", "optimizer.pt", "trainer.pt", "rank0.pt"}
    for f in files:
        torch.load(f, weights_only=True)
    opt = torch.load(os.path.join(str(tmp_path), "checkpoints", "step_00000002", "optimizer.pt"), weights_only=True)
    assert any("scalars" in st for st in opt["state"].values())  # Stable-SPAM statistics are saved


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, cache_dir, monkeypatch):
    base = SMALL + ["train.steps=6", "train.checkpoint_every=2", f"data.cache_dir={cache_dir}"]
    ref = run(load([TINY], base + [f"run.dir={tmp_path / 'ref'}"]))

    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("trainer.pt") and ".tmp-step_00000004" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    crash = str(tmp_path / "crash")
    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run(load([TINY], base + [f"run.dir={crash}"]))
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    root = os.path.join(crash, "checkpoints")
    assert os.path.isdir(os.path.join(root, ".tmp-step_00000004"))  # the half-written one
    assert not os.path.exists(os.path.join(root, "step_00000004"))
    assert ckpt_mod.latest(crash) == os.path.join(root, "step_00000002")
    out = run(load([TINY], base + [f"run.dir={crash}"]))
    assert out["resumed_from_step"] == 2 and out["steps"] == 6
    assert losses(crash) == losses(str(tmp_path / "ref"))
    assert out["val_loss"] == ref["val_loss"]
    assert not os.path.exists(os.path.join(root, ".tmp-step_00000004"))
