"""`lowbit report convergence --smoke`: each arm end to end with 5 steps on a micro model."""
import json
import math

import pytest

from lowbit.report import cli, noise


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convergence")


def run_arm(work, *args):
    out = work / "out"
    assert cli.main(["convergence", "--smoke", "--work", str(work), "--out", str(out), *args]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_ladder_arm(work):
    out, res = run_arm(work, "--arms", "ladder", "--recipes", "bf16", "nvfp4-no-rht")
    lad = res["analysis"]["ladder"]
    assert lad["band"]["n"] == 2 and lad["band"]["std"] > 0
    rows = {r["run"]: r for r in lad["rows"]}
    assert set(rows) == {"ladder-bf16-s0", "ladder-bf16-s1", "ladder-nvfp4-no-rht-s0"}
    r = rows["ladder-nvfp4-no-rht-s0"]
    assert math.isfinite(r["val_loss"]) and r["verdict"] in (noise.INDISTINGUISHABLE, noise.WORSE, noise.BETTER)
    assert r["rel_gap"] == pytest.approx((r["val_loss"] - lad["band"]["mean"]) / lad["band"]["mean"])
    assert (work / "smoke" / "recipes" / "nvfp4-no-rht.yaml").exists()
    assert res["runs"]["ladder-nvfp4-no-rht-s0"]["recipe"].endswith("nvfp4-no-rht.yaml")
    text = (out / "README.md").read_text()
    assert "## 1. Recipe ladder" in text and "| ladder-nvfp4-no-rht-s0 | nvfp4-no-rht | 0 |" in text
    assert (out / "ladder.png").stat().st_size > 0 and (out / "ladder_final.png").stat().st_size > 0


@pytest.mark.slow
def test_optim_arm(work):
    out, res = run_arm(work, "--arms", "optim", "--optimizers", "adamw", "stable_spam")
    runs = res["runs"]
    clean, spiked = runs["optim-mxfp4-adamw-clean-s0"], runs["optim-mxfp4-adamw-spikes-s0"]
    assert clean["spiked_steps"] == 0 and spiked["spiked_steps"] == 2  # steps 2 and 4 of 5
    assert clean["status"] == spiked["status"] == "completed"
    assert spiked["val_loss"] != clean["val_loss"]  # the spikes reach the weights
    opt = res["analysis"]["optim"]
    assert set(opt) == {"clean", "spikes"} and sorted(opt["spikes"]["order"]["mxfp4"]) == ["adamw", "stable_spam"]
    assert "## 2. 4-bit optimizer stability" in (out / "README.md").read_text() and (out / "optim.png").exists()


@pytest.mark.slow
def test_merge_arm_and_claims(work):
    """The merge arm merges the constant-LR run's checkpoints and scores them as the cosine runs are scored."""
    out, res = run_arm(work, "--arms", "ladder", "merge", "--recipes", "bf16", "fp8-tensorwise")
    mer = res["analysis"]["merge"]
    assert mer["steps"] == [1, 2, 3, 4, 5] and sum(mer["weights"]) == pytest.approx(1.0)
    # lowbit eval's score of a cosine run is its training summary's final validation loss
    for name, v in mer["cosine_final"].items():
        assert v == pytest.approx(res["runs"][name]["val_loss"], rel=1e-6)
    assert mer["merged"] != mer["constant_final"] and math.isfinite(mer["merged"])
    claims = {c["claim"]: c for c in res["analysis"]["claims"]}
    assert set(claims) == {"FP8 (tensor-wise) tracks BF16", next(c for c in claims if c.startswith("a constant-LR"))}
    text = (out / "README.md").read_text()
    assert "## Checkpoint merging" in text and "## Claims" in text


@pytest.mark.slow
def test_sft_arm(work):
    out, res = run_arm(work, "--arms", "sft", "--objectives", "nll", "neg_p")
    sft = res["analysis"]["sft"]
    assert set(sft) == {"strong", "weak"}
    for task in sft.values():
        assert 0 < task["prior_mean_prob"] < 1
        assert {r["objective"] for r in task["rows"]} == {"nll", "neg_p"}
        assert all(0 <= r["val_exact_match"] <= 1 and math.isfinite(r["val_loss"]) for r in task["rows"])
    assert res["runs"]["sft-weak-neg_p-s0"]["objective"] == "neg_p"
    assert (out / "sft.png").exists() and "## 3. SFT objectives" in (out / "README.md").read_text()


@pytest.mark.slow
def test_spike_loop_without_spikes_is_the_training_loop(tmp_path):
    """The optim arm's loop with no spikes gives lowbit.train.run's losses bit for bit."""
    import dataclasses

    from lowbit.report import arms, runner, spikes
    from lowbit.train import run

    s = dataclasses.replace(arms.Settings(), **cli.SMOKE)
    spec = arms.optim(s)[0]
    a = spikes.train(runner.config_of(spec, s, str(tmp_path / "a")), None)
    b = run(runner.config_of(spec, s, str(tmp_path / "b")))
    (ta, va), (tb, vb) = runner.curves(a["run_dir"]), runner.curves(b["run_dir"])
    assert len(ta) == 5 and ta == tb and va == vb and a["val_loss"] == b["val_loss"]
