"""`lowbit report continual --quick --seeds 2`: the harness end to end on a micro model, its metrics, and
the verdicts of the claims (pure functions, no model)."""
import importlib.util
import json
import math

import pytest
import torch

from lowbit.report import cli
from lowbit.report import continual as CL

from lowbit.report import continual_report as CR

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("continual")
    assert cli.main(["continual", "--quick", "--seeds", "2", "--seed", "5", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def each_run(res):
    for r in res["runs"]:
        yield from r["methods"].values()


@needs_transformers
def test_every_task_is_scored_after_every_stage_on_every_seed(quick):
    _, res = quick
    tasks = res["settings"]["tasks"]
    assert tasks == list(CL.TASKS) and res["seeds"] == [5, 6] and [r["seed"] for r in res["runs"]] == [5, 6]
    assert all(set(r["methods"]) == set(CL.METHODS) for r in res["runs"])
    for r in each_run(res):
        assert len(r["scores"]) == len(tasks)
        for stage in r["scores"]:
            assert set(stage) == set(tasks)
            assert all(0 <= s["acc"] <= 1 and math.isfinite(s["loss"]) and s["loss"] > 0 for s in stage.values())


@needs_transformers
def test_forgetting_and_plasticity_follow_the_matrix(quick):
    _, res = quick
    T = len(res["settings"]["tasks"])
    for r in each_run(res):
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
    adamw = res["runs"][0]["methods"]["adamw"]["scores"]
    assert adamw[0]["sort"]["loss"] != adamw[-1]["sort"]["loss"]


@needs_transformers
def test_seeds_differ_and_pair_across_methods(quick):
    _, res = quick
    a, b = (r["methods"]["adamw"]["scores"] for r in res["runs"])
    assert a != b  # another seed: other weights and data
    # same seed, same initial weights and data: the first stage differs between methods only by the optimizer,
    # and EWC is AdamW until its first penalty
    first = [r["methods"] for r in res["runs"]]
    assert all(m["adamw"]["scores"][0] == m["ewc"]["scores"][0] for m in first)


@needs_transformers
def test_stats_and_claims_come_from_the_seeds(quick):
    _, res = quick
    for m, st in res["stats"].items():
        for k in CL.METRICS:
            xs = [CL.metric(r["methods"][m]["summary"], k) for r in res["runs"]]
            assert st[k]["values"] == xs and st[k]["n"] == 2
            assert st[k]["mean"] == pytest.approx(sum(xs) / 2)
            assert st[k]["std"] == pytest.approx(abs(xs[0] - xs[1]) / math.sqrt(2))
    assert len(res["claims"]) == len(CL.CLAIMS)
    for c in res["claims"]:
        a, b = res["stats"][c["a"]][c["metric"]]["values"], res["stats"][c["b"]][c["metric"]]["values"]
        assert c["diffs"] == pytest.approx([x - y for x, y in zip(a, b)])
        assert c["verdict"] in (CL.REPRODUCED, CL.NOISE, CL.CONTRADICTED, CL.NO_NOISE)
        if c["z"] is not None:  # results.json writes nan as null
            assert c["verdict"] == CL.judge(c["z"], c["expect"])


@needs_transformers
def test_report_tables_claims_and_plot(quick):
    out, res = quick
    text = (out / "README.md").read_text()
    assert "| method | final acc (mean) | plasticity acc | forgetting acc |" in text
    for m in CL.METHODS:
        assert f"\n| {m} | " in text and f"## {m}" in text and " ± " in text
    assert "| after | sort | reverse | add |" in text and "| 1. sort | **" in text and "| forgetting | " in text
    claims = text.split("## Claims", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in claims.splitlines() if ln.startswith("- (")]
    assert len(lines) == len(CL.CLAIMS)
    assert all(" → **" in ln and "per seed " in ln and ", se " in ln and ", z " in ln for ln in lines)
    assert lines[0].startswith("- (a) CLASSP forgets less than AdamW [forgetting acc, classp − adamw]")
    pytest.importorskip("matplotlib")
    assert (out / "continual.png").stat().st_size > 0


# ---- the verdicts: pure functions ----------------------------------------------------------------------
def test_paired_statistics():
    p = CL.paired([1.0, 2.0, 4.0], [0.0, 1.0, 2.0])  # d = 1, 1, 2
    assert p["diffs"] == [1.0, 1.0, 2.0] and p["n"] == 3
    assert p["mean"] == pytest.approx(4 / 3)
    assert p["se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert p["z"] == pytest.approx(p["mean"] / p["se"])
    with pytest.raises(ValueError):
        CL.paired([1.0], [1.0, 2.0])


def test_one_seed_has_no_noise_estimate():
    p = CL.paired([0.3], [0.1])
    assert p["mean"] == pytest.approx(0.2) and math.isnan(p["se"]) and math.isnan(p["z"])
    for expect in ("lower", "higher", "tracks"):
        assert CL.judge(p["z"], expect) == CL.NO_NOISE


def test_se_zero():
    same = CL.paired([0.5, 0.7], [0.5, 0.7])  # identical values: every difference 0
    assert same["se"] == 0 and same["mean"] == 0 and same["z"] == 0
    assert CL.judge(same["z"], "tracks") == CL.REPRODUCED and CL.judge(same["z"], "lower") == CL.NOISE
    # every difference +0.25 (the second only up to float rounding): no spread, no noise estimate
    shifted = CL.paired([0.5, 0.7], [0.25, 0.45])
    assert shifted["se"] == 0 and shifted["mean"] == pytest.approx(0.25) and math.isnan(shifted["z"])
    assert all(CL.judge(shifted["z"], e) == CL.NO_NOISE for e in ("lower", "higher", "tracks"))


@pytest.mark.parametrize("z, expect, verdict", [
    (-2.5, "lower", CL.REPRODUCED), (-2.0, "lower", CL.NOISE), (1.9, "lower", CL.NOISE),
    (2.1, "lower", CL.CONTRADICTED),
    (2.5, "higher", CL.REPRODUCED), (2.0, "higher", CL.NOISE), (-3.0, "higher", CL.CONTRADICTED),
    (0.0, "tracks", CL.REPRODUCED), (-2.0, "tracks", CL.REPRODUCED), (2.01, "tracks", CL.CONTRADICTED),
    (-7.0, "tracks", CL.CONTRADICTED)])
def test_judge(z, expect, verdict):
    assert CL.judge(z, expect) == verdict


def test_judge_rejects_an_unknown_expectation():
    with pytest.raises(ValueError):
        CL.judge(1.0, "better")


def fake_res(values: dict[str, list[float]], metric="forgetting_loss") -> dict:
    """A results dict whose only nonzero metric is `metric`, one value per seed per method."""
    n = len(next(iter(values.values())))
    def summary(v):
        s = {key: {f"mean_{kind}": 0.0 for kind in ("final", "plasticity", "forgetting")} for key in ("acc", "loss")}
        kind, key = metric.rsplit("_", 1)
        s[key][f"mean_{kind}"] = v
        return s
    return {"seeds": list(range(n)), "runs": [{"seed": i, "methods": {m: {"summary": summary(v[i])}
                                                                     for m, v in values.items()}} for i in range(n)]}


def test_claims_pair_by_seed_and_skip_missing_methods():
    res = fake_res({"adamw": [2.0, 3.0, 2.5], "classp": [0.9, 2.1, 1.4]})  # classp - adamw: -1.1, -0.9, -1.1
    rows = {(c["label"], c["metric"]): c for c in CL.claims(res)}
    a = rows[("a", "forgetting_loss")]
    assert a["diffs"] == pytest.approx([-1.1, -0.9, -1.1]) and a["verdict"] == CL.REPRODUCED and a["z"] < -2
    assert rows[("a", "forgetting_acc")]["verdict"] == CL.NOISE  # all 0: z = 0
    assert rows[("b", "forgetting_loss")]["verdict"] == CL.NOT_RUN
    assert rows[("d", "forgetting_acc")]["verdict"] == CL.NOT_RUN
    text = CR.claim_line(a)
    assert "per seed -1.100, -0.900, -1.100" in text and "**reproduced**" in text and "classp forgets less" in text
    one = CL.claims(fake_res({"adamw": [2.0], "classp": [1.0], "ewc": [1.5]}))
    assert all(c["verdict"] == CL.NO_NOISE for c in one)
    assert "**no noise estimate**" in CR.claim_line(one[0])


def test_claim_lines_state_resolution_and_direction():
    tracks = CL.claims(fake_res({"adamw": [1.0, 1.0, 1.0], "classp": [1.0, 1.2, 0.9], "ewc": [5.0, 5.1, 5.3]}))
    rows = {(c["label"], c["metric"]): c for c in tracks}
    b = rows[("b", "forgetting_loss")]  # classp - ewc: far below, so "competitive" fails downwards
    assert b["verdict"] == CL.CONTRADICTED and "classp is lower than ewc (classp forgets less)" in CR.claim_line(b)
    d = rows[("d", "forgetting_loss")]  # ewc forgets far more than adamw here
    assert d["verdict"] == CL.CONTRADICTED and "ewc forgets more" in CR.claim_line(d)
    ok = CL.claims(fake_res({"adamw": [1.0, 1.0, 1.0], "classp": [1.1, 0.8, 1.05]}, "plasticity_acc"))
    c = next(c for c in ok if c["metric"] == "plasticity_acc")
    assert c["verdict"] == CL.REPRODUCED and f"resolution ±{2 * c['se']:.3f}" in CR.claim_line(c)


@needs_transformers
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
