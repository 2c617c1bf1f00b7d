"""A catalogue of bad configs: each fails in `load` (before any work) with a message naming the key."""
import os

import pytest

from _train_helpers import TINY

from lowbit.train import ConfigError, load
from lowbit.train.config import describe

BAD = [
    (["model.hidden=64"], "unknown key 'model.hidden'"),
    (["foo.bar=1"], "unknown key 'foo'"),
    (["train.steps=abc"], "bad value for 'train.steps'"),
    (["train.steps=0"], "train.steps: expected an int >= 1"),
    (["optim.name=sgd"], "optim.name: expected one of ['adamw', 'stable_spam', 'spam', 'classp']"),
    (["model.hidden_size=100", "model.num_heads=3"], "model.hidden_size: expected a multiple of model.num_heads (3)"),
    (["model.num_kv_heads=3"], "model.num_kv_heads: expected a divisor of model.num_heads (4)"),
    (["model.dtype=float16"], "model.dtype: expected one of ['float32', 'bfloat16']"),
    (["dist.zero_stage=3", "objective.fused=true"], "objective.fused: the fused LM head reads lm_head.weight"),
    (["dist.zero_stage=2", "dist.engine=torch"], "dist.zero_stage: ZeRO stage 2 needs the DeepSpeed engine"),
    (["dist.zero_stage=4"], "dist.zero_stage: expected 0, 1, 2 or 3"),
    (["quant.recipe=fp3"], "quant.recipe: unknown recipe 'fp3'"),
    (["quant.recipe=mxfp4", "quant.strict=true", "model.intermediate_size=48"],
     "quant.recipe: mxfp4 cannot quantize gate_proj/up_proj (256 -> 48) with quant.strict=true"),
    (["data.train=/nonexistent/corpus.txt"], "data.train: no such file or directory '/nonexistent/corpus.txt'"),
    (["data.val_fraction=1.5"], "data.val_fraction: expected a fraction in (0, 1)"),
    (["optim.state_dtype=bf16"], "optim.state_dtype: 'bf16' needs optim.name stable_spam or spam"),
    (["optim.args.foo=1"], "optim.args: adamw rejected the arguments ['foo']"),
    (["optim.name=stable_spam", "optim.args.gamma1=1.5"], "gamma1: expected a number in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas: expected two numbers in [0, 1)"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"],
     "train.global_batch_size: expected a multiple of train.micro_batch_size (4)"),
    (["objective.name=neg_p"], "objective.name: pretrain trains with nll"),
    (["run.resume=/no/such/ckpt"], "run.resume: expected auto, never or an existing checkpoint dir"),
    (["model.init_from=/no/such/run"], "model.init_from: no such checkpoint / directory '/no/such/run'"),
    (["train.steps"], "override 'train.steps': expected key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError) as err:
        load([TINY], overrides, task="pretrain")
    assert message in str(err.value)


def test_task_specific_errors():
    with pytest.raises(ConfigError, match=r"objective.name: expected one of \['nll', 'neg_p'"):
        load([TINY], ["objective.name=log_p"], task="sft")
    with pytest.raises(ConfigError, match=r"align.method: expected one of \['dpo', 'kldo', 'kto', 'bco'\]"):
        load([TINY], ["align.method=ipo"], task="align")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load([TINY], ["train.steps=0", "optim.lr=-1", "data.seq_len=1"])
    text = str(err.value)
    assert "train.steps" in text and "optim.lr" in text and "data.seq_len" in text


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load([str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load([str(tmp_path / "list.yaml")])
    (tmp_path / "typo.yaml").write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'train.stepz'; expected one of \[.*'steps'"):
        load([str(tmp_path / "typo.yaml")])


def test_files_then_overrides_merge_in_order(tmp_path):
    (tmp_path / "b.yaml").write_text("train:\n  steps: 7\n  seed: 3\n")
    cfg = load([TINY, str(tmp_path / "b.yaml")], ["train.seed=5"])
    assert (cfg.train.steps, cfg.train.seed, cfg.model.hidden_size) == (7, 5, 256)


def test_shipped_configs_validate():
    root = os.path.join(os.path.dirname(TINY), "..")
    for task, name in [("pretrain", "pretrain/tiny.yaml"), ("pretrain", "pretrain/125m.yaml"),
                       ("pretrain", "pretrain/1b.yaml"), ("sft", "sft/tiny.yaml"), ("align", "align/dpo-tiny.yaml"),
                       ("align", "align/kldo-tiny.yaml")]:
        load([os.path.join(root, name)], task=task)


def test_cli_reports_config_errors_and_help(capsys):
    from lowbit.cli import main
    assert main(["pretrain", "--config", TINY, "optim.name=sgd"]) == 2
    assert "optim.name: expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["sft", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for key, default, _ in describe():
        if key != "task":
            assert key in out
    assert "train.steps = 100" in out
