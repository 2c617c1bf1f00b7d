"""CLI end to end on CPU: pretrain 30 steps, eval, sft 20 steps (from the pretrained run), align 10 steps."""
import json
import math
import os

import torch

from _train_helpers import SMALL, TINY, lowbit_cli

SFT = os.path.join(os.path.dirname(TINY), "..", "sft", "tiny.yaml")
DPO = os.path.join(os.path.dirname(TINY), "..", "align", "dpo-tiny.yaml")


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pretrain_eval_sft_align(tmp_path, cache_dir):
    common = SMALL + [f"data.cache_dir={cache_dir}"]
    pre = str(tmp_path / "pre")
    out = _ok(lowbit_cli(["pretrain", "--config", TINY, "train.steps=30", f"run.dir={pre}", "optim.lr=3e-3"] + common))
    assert "val_ppl" in out.stdout and "metrics.jsonl" in out.stdout
    s = json.load(open(os.path.join(pre, "summary.json")))
    assert s["status"] == "completed" and s["steps"] == 30 and s["engine"] == "torch"
    assert math.isclose(s["val_ppl"], math.exp(s["val_loss"]), rel_tol=1e-9)
    lines = [json.loads(x) for x in open(s["metrics"])]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    # the HF export loads with plain transformers and reproduces the trained model's validation loss
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(s["hf_export"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(s["hf_export"], local_files_only=True)
    assert hf.config.vocab_size == len(tok)
    ck = torch.load(os.path.join(s["checkpoint"], "model.pt"), weights_only=True)
    assert all(torch.equal(ck[k], v) for k, v in hf.state_dict().items() if k in ck)

    ev = _ok(lowbit_cli(["eval", "--checkpoint", pre, "--batches", "2", "--output", str(tmp_path / "ev.json")]))
    res = json.load(open(tmp_path / "ev.json"))
    assert "val_ppl" in ev.stdout and res["val_ppl"] > 1 and 0 <= res["sft_task_exact_match"] <= 1

    sft = str(tmp_path / "sft")
    _ok(lowbit_cli(["sft", "--config", SFT, f"model.init_from={pre}", "train.steps=20", f"run.dir={sft}",
                    "data.synthetic_examples=256", "--objective", "neg_p"] + common))
    s2 = json.load(open(os.path.join(sft, "summary.json")))
    assert s2["objective"] == "neg_p" and s2["steps"] == 20 and 0 <= s2["val_exact_match"] <= 1
    assert s2["parameters"] == s["parameters"]  # the architecture came from the checkpoint

    al = str(tmp_path / "align")
    _ok(lowbit_cli(["align", "--config", DPO, f"model.init_from={sft}", "train.steps=10", f"run.dir={al}",
                    "data.synthetic_examples=64"] + common))
    s3 = json.load(open(os.path.join(al, "summary.json")))
    first = [json.loads(x) for x in open(s3["metrics"])][0]
    # the policy starts equal to the reference: DPO loss log 2, zero margin
    assert abs(first["loss"] - math.log(2)) < 1e-5 and abs(first["margin"]) < 1e-5
    assert 0 <= s3["val_reward_accuracy"] <= 1
