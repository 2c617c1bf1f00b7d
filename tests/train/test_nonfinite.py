"""A non-finite loss skips the step (weights untouched, logged); K consecutive ones stop the run; spikes are logged."""
import json
import os

import torch

from _train_helpers import SMALL, TINY, read_metrics

import lowbit.train.losses as losses_mod
from lowbit.train import load, run


def _poison(monkeypatch, bad_calls):
    real = losses_mod.token_loss
    calls = {"n": 0}

    def token_loss(model, batch, obj, objective=None):
        calls["n"] += 1
        loss, st, n = real(model, batch, obj, objective)
        return (loss * float("nan") if calls["n"] in bad_calls else loss), st, n
    monkeypatch.setattr(losses_mod, "token_loss", token_loss)


def test_nonfinite_steps_are_skipped(tmp_path, cache_dir, monkeypatch):
    base = SMALL + ["train.steps=6", f"data.cache_dir={cache_dir}", "run.export_hf=false", "train.checkpoint_every=1",
                    "train.keep_checkpoints=10"]
    _poison(monkeypatch, {3})  # the forward of step 3 (one micro-batch per step)
    d = str(tmp_path / "nan")
    out = run(load([TINY], base + [f"run.dir={d}"]))
    assert out["status"] == "completed" and out["skipped_steps"] == 1
    skips = read_metrics(d, "skip")
    assert [r["step"] for r in skips] == [3] and skips[0]["consecutive"] == 1
    # the skipped step left weights and optimizer state as they were after step 2; step 4 moved on
    ck = lambda step, f: torch.load(os.path.join(d, "checkpoints", f"step_{step:08d}", f), weights_only=True)
    w2, w3, w4 = ck(2, "model.pt"), ck(3, "model.pt"), ck(4, "model.pt")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)
    o2, o3 = ck(2, "optimizer.pt"), ck(3, "optimizer.pt")
    assert all(torch.equal(o2["state"][i]["exp_avg"], o3["state"][i]["exp_avg"]) for i in o2["state"])

def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, cache_dir, monkeypatch):
    _poison(monkeypatch, set(range(3, 100)))
    d = str(tmp_path / "stop")
    out = run(load([TINY], SMALL + ["train.steps=20", "train.max_bad_steps=3", f"data.cache_dir={cache_dir}",
                                    f"run.dir={d}", "run.export_hf=false"]))
    assert out["status"] == "stopped" and out["steps"] == 5
    assert "3 consecutive non-finite steps (train.max_bad_steps=3)" in out["message"]
    assert json.load(open(os.path.join(d, "summary.json")))["status"] == "stopped"


def test_loss_spike_is_logged(tmp_path, cache_dir, monkeypatch):
    real = losses_mod.token_loss
    calls = {"n": 0}

    def token_loss(model, batch, obj, objective=None):
        calls["n"] += 1
        loss, st, n = real(model, batch, obj, objective)
        return (loss * 20 if calls["n"] == 12 else loss), st, n
    monkeypatch.setattr(losses_mod, "token_loss", token_loss)
    d = str(tmp_path / "spike")
    out = run(load([TINY], SMALL + ["train.steps=13", f"data.cache_dir={cache_dir}", f"run.dir={d}",
                                    "run.export_hf=false"]))
    spikes = read_metrics(d, "spike")
    assert out["loss_spikes"] == 1 and [r["step"] for r in spikes] == [12]
    assert spikes[0]["loss"] > 3 * spikes[0]["running_mean"]
