"""The `lowbit` dispatcher: launcher flags are dropped in every spelling, commands reach their module."""
import os

import pytest

from lowbit.cli import main
from lowbit.launcher import strip_launcher_args

SEER_TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "seer", "tiny.yaml")


@pytest.mark.parametrize("flags", [["--local_rank=1"], ["--local-rank=1"], ["--local_rank", "1"], ["--local-rank", "1"]])
def test_launcher_flag_is_dropped(flags):
    assert strip_launcher_args([*flags, "pretrain", "--config", "a.yaml", *flags, "train.steps=1"]) == \
        ["pretrain", "--config", "a.yaml", "train.steps=1"]


def test_other_arguments_are_kept():
    argv = ["seer", "eval", "--gates", "g.pt", "--local_ranking=2", "1"]
    assert strip_launcher_args(argv) == argv


def test_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("pretrain", "sft", "align", "eval", "env", "seer", "bench", "report"):
        assert f"  {cmd} " in out
    assert main([]) == 2
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--local_rank", "0"], ["--local_rank=0"]])
def test_seer_under_a_launcher(flags, capsys, tmp_path):
    pytest.importorskip("omegaconf")
    # the flag in front of the command (where deepspeed puts it) and among the command's own arguments
    assert main([*flags, "seer", "distill", SEER_TINY, *flags, "gate.block_size=48", f"output={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "lowbit seer distill:" in err and "block_size" in err and "unrecognized" not in err
