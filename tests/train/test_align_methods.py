"""align.method=kto|bco beside DPO / KLDO: KTO's mismatched pairs, BCO's checkpointed running mean, the data
formats each method takes, and `lowbit eval --separation`."""
import json
import os

import pytest
import torch

import _hf_models as H

from lowbit.train import ConfigError, corpus, load, run, sft_data
from lowbit.train import eval_cli
from lowbit.train import losses as L
from lowbit.train.chat import IGNORE

RUN = ["train.micro_batch_size=4", "train.eval_batches=1", "run.progress=false", "run.tensorboard=false",
       "data.seq_len=48", "optim.warmup_steps=0", "run.export_hf=false"]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return H.save("qwen2", str(tmp_path_factory.mktemp("qwen2")))


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shipped_align_configs_validate():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "align")
    for name in ("kto", "bco"):
        assert load([os.path.join(root, f"{name}-tiny.yaml")], task="align").align.method == name


def test_kto_pairs_each_prompt_with_the_previous_response():
    ids = torch.tensor([[1, 2, 10, 11, 0], [3, 20, 21, 22, 0], [4, 5, 6, 30, 0]])
    labels = torch.where(torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]]) == 1, ids,
                         torch.full_like(ids, IGNORE))
    batch = {"input_ids": ids, "labels": labels, "prompt_len": torch.tensor([2, 1, 3]),
             "length": torch.tensor([4, 4, 4])}
    kl_ids, kl_labels = L.kl_batch(batch)
    # prompt 0 + response 2, prompt 1 + response 0, prompt 2 + response 1 (cut to the row length)
    assert kl_ids.tolist() == [[1, 2, 30, 0, 0], [3, 10, 11, 0, 0], [4, 5, 6, 20, 21]]
    assert kl_labels.tolist() == [[IGNORE, IGNORE, 30, IGNORE, IGNORE], [IGNORE, 10, 11, IGNORE, IGNORE],
                                  [IGNORE, IGNORE, IGNORE, 20, 21]]


def test_data_formats_per_method(tmp_path, qwen2):
    tok = H.tokenizer("qwen2")
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)])
    labelled = _jsonl(tmp_path / "labelled.jsonl", [{"prompt": "q", "completion": "ok", "label": True}] * 3)
    cfg = load([], [f"data.train={pairs}", f"data.validation={pairs}", "align.method=kto"], task="align")
    train, _, _ = sft_data.preference_data(cfg, tok)
    assert len(train) == 6 and [bool(train[i]["aligned"]) for i in range(2)] == [True, False]  # a pair = two examples
    cfg = load([], [f"data.train={labelled}", f"data.validation={labelled}", "align.method=dpo"], task="align")
    with pytest.raises(corpus.DataError, match=r"labelled.jsonl:1: DPO records need prompt, chosen and rejected"):
        sft_data.preference_data(cfg, tok)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "ok", "label": "yes"}])
    cfg = load([], [f"data.train={bad}", f"data.validation={bad}", "align.method=bco"], task="align")
    with pytest.raises(corpus.DataError, match=r"bad.jsonl:1: label: expected true .* got 'yes'"):
        sft_data.preference_data(cfg, tok)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: kto pairs each prompt .* needs >= 2, got 1"):
        load([], ["align.method=kto", "train.micro_batch_size=1"], task="align")
    with pytest.raises(ConfigError, match=r"align.separation_data: no such file"):
        load([], ["align.separation_data=/no/such.jsonl"], task="align")


def test_bco_running_mean_is_checkpointed_and_restored(tmp_path, qwen2):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"add {i} + 1", "response": str(i + 1) if i % 2 else "no",
                                          "label": i % 2 == 1} for i in range(20)])
    base = RUN + [f"model.init_from={qwen2}", f"data.train={data}", "align.method=bco", "optim.lr=1e-2",
                  "optim.schedule=constant"]
    full = run(load([], base + ["train.steps=2", f"run.dir={tmp_path / 'full'}"], task="align"))
    part = str(tmp_path / "part")
    run(load([], base + ["train.steps=1", f"run.dir={part}"], task="align"))
    state = torch.load(os.path.join(part, "checkpoints", "step_00000001", "trainer.pt"), weights_only=True)
    assert state["task"]["bco_running_mean"]["count"] == 4  # every reward of the step's 4 examples
    resumed = run(load([], base + ["train.steps=2", f"run.dir={part}"], task="align"))
    assert resumed["resumed_from_step"] == 1

    def last(d):
        return [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl")) if '"kind": "train"' in x][-1]
    a, b = last(full["run_dir"]), last(part)
    # delta at step 2 averages the rewards of both steps: the resumed run read step 1's from the checkpoint
    assert a["step"] == b["step"] == 2 and a["delta"] == pytest.approx(b["delta"], rel=1e-6) and a["delta"] != 0
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_eval_separation(tmp_path, qwen2, capsys):
    rows = [{"prompt": f"how do I bake bread, step {i}?", "label": "safe"} for i in range(4)] + \
           [{"prompt": f"how do I make a weapon, step {i}?", "label": "harmful"} for i in range(4)]
    data = _jsonl(tmp_path / "sep.jsonl", rows)
    out = tmp_path / "sep.json"
    assert eval_cli.main(["--checkpoint", qwen2, "--separation", data, "--layer", "1", "--output", str(out)]) == 0
    res = json.load(open(out))
    assert res["layer"] == 1 and res["n_aligned"] == res["n_unaligned"] == 4 and 0 <= res["p_value"] <= 1
    assert "bhattacharyya_distance" in capsys.readouterr().out
    bad = _jsonl(tmp_path / "bad.jsonl", rows[:3] + [{"prompt": "x", "label": "evil"}])
    assert eval_cli.main(["--checkpoint", qwen2, "--separation", bad]) == 2
    assert "bad.jsonl:4: label: expected one of 'safe', 'aligned', 'harmful', 'unaligned'" in capsys.readouterr().err
    assert "safe" in eval_cli.parser().format_help() and "harmful" in eval_cli.parser().format_help()
