"""`lowbit report continual --quick`: the harness end to end on a micro model, and its metrics."""
import json
import math

import pytest
import torch

from lowbit.report import cli
from lowbit.report import continual as CL

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    assert cli.main(["continual", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_task_is_scored_after_every_stage(quick):
    _, res = quick
    tasks = res["settings"]["tasks"]
    assert tasks == list(CL.TASKS) and set(res["methods"]) == set(CL.METHODS)
    for r in res["methods"].values():
        assert len(r["scores"]) == len(tasks)
        for stage in r["scores"]:
            assert set(stage) == set(tasks)
            assert all(0 <= s["acc"] <= 1 and math.isfinite(s["loss"]) and s["loss"] > 0 for s in stage.values())


def test_forgetting_and_plasticity_follow_the_matrix(quick):
    _, res = quick
    T = len(res["settings"]["tasks"])
    for r in res["methods"].values():
        for key, sign in (("acc", 1), ("loss", -1)):
            sm = r["summary"][key]
            R = sm["matrix"]
            assert sm["plasticity"] == [R[j][j] for j in range(T)]
            assert sm["final"] == R[-1]
            for j, f in enumerate(sm["forgetting"]):
                best = max(sign * R[i][j] for i in range(j, T - 1))
                assert f == pytest.approx(best - sign * R[-1][j])
            assert len(sm["forgetting"]) == T - 1
    # training the later tasks moves the first task's loss: forgetting is measured, not assumed 0
    assert res["methods"]["adamw"]["scores"][0]["sort"]["loss"] != res["methods"]["adamw"]["scores"][-1]["sort"]["loss"]


def test_report_tables_and_plot(quick):
    out, res = quick
    text = (out / "README.md").read_text()
    assert "| method | final acc (mean) | plasticity acc | forgetting acc |" in text
    for m in CL.METHODS:
        assert f"\n| {m} | " in text and f"## {m}" in text
    assert "| after | sort | reverse | add |" in text and "| 1. sort | **" in text and "| forgetting | " in text
    pytest.importorskip("matplotlib")
    assert (out / "continual.png").stat().st_size > 0


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    s = CL.Settings(**CL.QUICK)
    model = CL.make_model(s)
    ewc = CL.EWC(strength=10.0)
    ids, labels = CL.held_out("sort", s)
    ewc.consolidate(model, ids[:4], labels[:4])
    fisher, _ = ewc.terms[0]
    assert all(f.min() >= 0 for f in fisher) and sum(float(f.sum()) for f in fisher) > 0
    with torch.no_grad():
        assert float(ewc.penalty(model)) == 0.0
        for p in model.parameters():
            p.add_(0.01)
        assert float(ewc.penalty(model)) > 0
