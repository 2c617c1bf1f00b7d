"""`lowbit seer distill` and `lowbit seer eval` end to end on the smoke config (random tiny Llama)."""
import csv
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("omegaconf")

from lowbit.train.seer import main  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "seer", "tiny.yaml")
SMALL = ["data.seq_len=128", "data.batch_size=1", "gate.block_size=16", "gate.gate_dim=16",
         "model.random.hidden_size=64", "model.random.intermediate_size=64", "train.log_every=4"]


def test_distill_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", CONFIG, "train.steps=8", f"output={out}", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["layers"] == 2
    assert summary["held_out_kl_after"] < summary["held_out_kl_before"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 5, 8]
    assert (out / "gates.pt").stat().st_size < 50_000

    assert main(["eval", "--gates", str(out / "gates.pt"), "--densities", "0.5", "--thresholds", "0.1",
                 "--batches", "1"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["dense", "gate", "static", "oracle", "gate"]
    for r in rows[1:4]:  # equal density for the three patterns
        assert float(r["density"]) == float(rows[1]["density"])
    assert "| oracle | density=0.5 |" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["distill", CONFIG, "gate.block_size=48", f"output={tmp_path}"]) == 2
    assert "block_size" in capsys.readouterr().err
    assert main(["distill", CONFIG, "train.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["distill", CONFIG, "gate.k_pool=[median]"]) == 2
    assert "gate.k_pool" in capsys.readouterr().err
    assert main(["bogus"]) == 2
