"""In-process runs of what the CLI test does not cover: a quantized recipe end to end (train, resume,
HF export of a converted model), KLDO alignment, and SFT with --objective auto."""
import json
import os

import pytest
import torch

from _train_helpers import SMALL, TINY, losses

from lowbit.train import load, run

ROOT = os.path.dirname(os.path.dirname(TINY))


def test_nvfp4_recipe_trains_resumes_and_exports(tmp_path, cache_dir):
    pytest.importorskip("lowbit.nn")
    base = SMALL + ["quant.recipe=nvfp4", "optim.name=stable_spam", f"data.cache_dir={cache_dir}"]
    full = run(load([TINY], base + ["train.steps=4", f"run.dir={tmp_path / 'full'}"]))
    assert full["recipe"] == "nvfp4" and full["status"] == "completed"
    part = str(tmp_path / "part")
    run(load([TINY], base + ["train.steps=2", f"run.dir={part}", "run.export_hf=false"]))
    resumed = run(load([TINY], base + ["train.steps=4", f"run.dir={part}"]))
    assert resumed["resumed_from_step"] == 2
    assert losses(part) == losses(str(tmp_path / "full"))  # stochastic rounding seeds resume too
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(full["hf_export"], local_files_only=True)
    assert all(type(m) is not torch.nn.Module and "LowBit" not in type(m).__name__ for m in hf.modules())
    assert hf.num_parameters() == full["parameters"]
    # continued pretraining from the run: its tokenizer and weights, this run's recipe (none)
    more = run(load([TINY], SMALL + [f"data.cache_dir={cache_dir}", "train.steps=1", f"model.init_from={full['run_dir']}",
                                     f"run.dir={tmp_path / 'more'}", "run.export_hf=false"]))
    assert more["recipe"] == "bf16" and losses(more["run_dir"])[1] < losses(full["run_dir"])[1] - 0.1


def test_kldo_alignment(tmp_path, cache_dir):
    out = run(load([os.path.join(ROOT, "align", "kldo-tiny.yaml")],
                   SMALL + ["train.steps=3", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                            "data.synthetic_examples=64", "run.export_hf=false"], task="align"))
    assert out["task"] == "align" and out["steps"] == 3
    rows = [json.loads(x) for x in open(out["metrics"])]
    first = rows[0]
    # policy == reference at the start: every reward is 0, so the DV estimate is 0
    assert abs(first["loss"]) < 1e-6 and abs(first["kl_estimate"]) < 1e-6
    ck = torch.load(os.path.join(out["checkpoint"], "trainer.pt"), weights_only=True)
    assert ck["task"]["kldo_log_mean"] is not None  # the moving average is checkpointed


def test_sft_objective_auto(tmp_path, cache_dir, capsys):
    out = run(load([os.path.join(ROOT, "sft", "tiny.yaml")],
                   SMALL + ["train.steps=1", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                            "data.synthetic_examples=64", "objective.name=auto", "run.export_hf=false"], task="sft"))
    printed = capsys.readouterr().out
    assert "objective auto: mean target probability" in printed and "recommended objective" in printed
    # an untrained model assigns ~1/vocab to every target: the weak-prior end, where NLL is recommended
    assert out["objective"] == "nll"


def test_fused_loss_matches_materialised_logits(tmp_path, cache_dir):
    sft = os.path.join(ROOT, "sft", "tiny.yaml")
    common = SMALL + ["train.steps=2", f"data.cache_dir={cache_dir}", "data.synthetic_examples=64",
                      "run.export_hf=false", "objective.name=neg_p"]
    a = run(load([sft], common + [f"run.dir={tmp_path / 'a'}"], task="sft"))
    b = run(load([sft], common + [f"run.dir={tmp_path / 'b'}", "objective.fused=true"], task="sft"))
    la, lb = losses(a["run_dir"]), losses(b["run_dir"])
    assert la[1] == pytest.approx(lb[1], rel=1e-5) and la[2] == pytest.approx(lb[2], rel=1e-4)
