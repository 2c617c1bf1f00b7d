"""lowbit.report building blocks: noise band and verdicts, recipe variants, spike injection, arm plans, SFT tasks."""
import dataclasses
import math

import pytest
import torch

from lowbit.nn.recipe import RECIPES, load_recipe
from lowbit.report import arms as A
from lowbit.report import noise, plots, sft_tasks, spikes, variants


def test_band_and_verdicts():
    b = noise.band([1.0, 1.02, 0.98])
    assert b.mean == pytest.approx(1.0) and b.std == pytest.approx(0.02) and b.n == 3
    assert (b.low, b.high) == (0.98, 1.02) and b.rel_std == pytest.approx(0.02)
    assert noise.rel_gap(1.05, b) == pytest.approx(0.05)
    assert noise.sigmas(1.03, b) == pytest.approx(1.5)
    assert noise.verdict(1.04, b) == noise.INDISTINGUISHABLE  # exactly 2 sigma is still a tie
    assert noise.verdict(1.0401, b) == noise.WORSE and noise.verdict(0.9599, b) == noise.BETTER
    assert noise.verdict(1.05, b, k=3) == noise.INDISTINGUISHABLE
    assert noise.verdict(float("nan"), b) == noise.WORSE  # a diverged run is worse, not a tie
    one = noise.band([1.0])
    assert math.isnan(one.std) and noise.verdict(1.5, one) == noise.NO_BAND
    with pytest.raises(ValueError, match="at least one"):
        noise.band([])
    with pytest.raises(ValueError, match="finite"):
        noise.band([1.0, float("nan")])


def test_variants_change_only_what_they_name(tmp_path):
    base = RECIPES["nvfp4"]
    no_rht = variants.recipe_of("nvfp4-no-rht")
    no_sr = variants.recipe_of("nvfp4-no-sr")
    for op in ("fprop_input", "fprop_weight", "dgrad_grad", "dgrad_weight", "wgrad_grad", "wgrad_input"):
        b, r, s = getattr(base, op), getattr(no_rht, op), getattr(no_sr, op)
        assert r.hadamard is None and dataclasses.replace(r, hadamard=b.hadamard) == b
        assert s.rounding == "nearest" and dataclasses.replace(s, rounding=b.rounding) == b
    assert base.wgrad_grad.hadamard == 16 and base.dgrad_grad.rounding == "stochastic"  # the ablations remove something
    assert no_rht.keep_last_fraction == no_sr.keep_last_fraction == base.keep_last_fraction
    path = variants.write("nvfp4-no-sr", str(tmp_path))
    assert load_recipe(path) == no_sr
    assert variants.write("mxfp4", str(tmp_path)) == "mxfp4"  # built-ins go by name
    with pytest.raises(ValueError, match="unknown"):
        variants.recipe_of("nvfp3")


def test_spike_injection_is_sparse_exact_and_deterministic():
    plan = spikes.SpikePlan(start=3, every=4, fraction=0.01, factor=1000.0, seed=5)
    assert [s for s in range(1, 15) if plan.at(s)] == [3, 7, 11]
    w = torch.nn.Parameter(torch.zeros(200, 100))
    b = torch.nn.Parameter(torch.zeros(100))
    w.grad, b.grad = torch.ones(200, 100), torch.ones(100)
    n = spikes.inject([w, b], plan, 7)
    hit = w.grad == 1000.0
    assert int(hit.sum()) == n and 100 < n < 300  # ~1 % of 20000 entries
    assert bool(((w.grad == 1.0) | hit).all()) and torch.equal(b.grad, torch.ones(100))  # 1-D grads untouched
    w.grad = torch.ones(200, 100)
    assert spikes.inject([w], plan, 7) == n and torch.equal(w.grad == 1000.0, hit)  # same step, same entries
    w.grad = torch.ones(200, 100)
    spikes.inject([w], plan, 11)
    assert not torch.equal(w.grad == 1000.0, hit)


def test_arm_plans():
    s = A.Settings(baseline_seeds=3)
    specs = A.plan(s)
    names = [x.name for x in specs]
    # the clean AdamW mxfp4 cell is the ladder's mxfp4 run, planned once
    assert len(names) == len(set(names)) == (3 + 7) + 5 + 6
    assert [x.group for x in specs if x.arm == "ladder"][:3] == ["bf16"] * 3
    assert {x.group for x in specs if x.arm == "ladder"} == set(A.LADDER)
    opt = [x for x in specs if x.arm == "optim"]
    assert all(x.spikes for x in opt) and sum(x.inject for x in opt) == 3
    assert "optim-mxfp4-adamw-clean-s0" not in names and "optim-mxfp4-adamw-spikes-s0" in names
    assert all("quant.recipe=mxfp4" in x.overrides for x in opt)
    sft = [x for x in specs if x.arm == "sft"]
    assert all(x.needs == "ladder-bf16-s0" for x in sft) and {x.sft_task for x in sft} == {"strong", "weak"}
    only_sft = A.plan(s, ("sft",))
    assert [x.name for x in only_sft if x.arm == "ladder"] == ["ladder-bf16-s0"]  # its base is pretrained first
    with pytest.raises(ValueError, match="baseline"):
        A.plan(dataclasses.replace(s, recipes=("mxfp4",)))


def test_cells_and_seeds():
    s = A.Settings(recipes=("bf16", "int4"), recipe_seeds=2, cells=("int4:adamw", "int4:spam", "bf16:stable_spam"),
                   optim_seeds=2, conditions=("clean",))
    specs = A.plan(s, ("ladder", "optim"))
    assert [x.name for x in specs] == ["ladder-bf16-s0", "ladder-bf16-s1", "ladder-bf16-s2", "ladder-int4-s0",
                                       "ladder-int4-s1", "optim-int4-spam-clean-s0", "optim-int4-spam-clean-s1",
                                       "optim-bf16-stable_spam-clean-s0", "optim-bf16-stable_spam-clean-s1"]
    assert all((x.recipe, x.optimizer) == ("int4", "spam") for x in specs[5:7])
    for bad in (("int4",), ("int4:sgd",), (":adamw",)):
        with pytest.raises(ValueError, match="cells"):
            A.plan(dataclasses.replace(s, cells=bad), ("optim",))
    with pytest.raises(ValueError, match="conditions"):
        A.plan(dataclasses.replace(s, conditions=("noisy",)), ("optim",))


def test_merge_spec():
    s = A.Settings(steps=300, merge_checkpoints=10, merge_last=5)
    (m,) = A.plan(s, ("merge",))
    assert m.condition == "constant-lr" and m.recipe == "bf16"
    assert {"optim.schedule=constant", "train.checkpoint_every=30", "train.keep_checkpoints=5"} <= set(m.overrides)


@pytest.mark.parametrize("preset, n_runs", [("resolve", 22), ("fourbit", 29)])
def test_presets(preset, n_runs):
    from lowbit.report import cli

    p = cli.parser()
    p.set_defaults(**cli.PRESETS[preset])
    args = p.parse_intermixed_args(["convergence"])
    s = cli.settings_of(args)
    specs = A.plan(s, tuple(args.arms))
    assert len(specs) == len({x.name for x in specs}) == n_runs
    # INT4 quantizes groups of 256 along every reduction: the widths must be multiples of 256, or the
    # model's Linears would silently stay in high precision
    assert s.hidden % 256 == 0 and s.intermediate % 256 == 0 and (s.batch * s.seq_len) % 256 == 0
    table = {(x.recipe, x.optimizer, x.condition) for x in specs}
    if preset == "resolve":
        assert {("bf16", "stable_spam", "clean"), ("int4", "stable_spam", "clean"), ("nvfp4", "adamw", "clean")} <= table
        assert sum(x.recipe == "bf16" and x.optimizer == "adamw" and x.arm == "ladder" for x in specs) == 5
    else:
        assert len(table) == (1 + 2 * 3) * 2  # (bf16 adamw + (int4, mxfp4) x 3 optimizers) x 2 conditions
    override = cli.parser()
    override.set_defaults(**cli.PRESETS[preset])
    assert override.parse_intermixed_args(["convergence", "--steps", "7"]).steps == 7  # flags beat the preset


def test_claim_verdicts():
    from lowbit.report import claims as C

    assert C.verdict(2.5, "worse", 2) == C.REPRODUCED and C.verdict(1.9, "worse", 2) == C.NOISE
    assert C.verdict(-2.5, "worse", 2) == C.CONTRADICTED and C.verdict(-2.5, "better", 2) == C.REPRODUCED
    assert C.verdict(1.0, "tracks", 2) == C.REPRODUCED and C.verdict(-3.0, "tracks", 2) == C.CONTRADICTED
    assert C.verdict(-5.0, "not worse", 2) == C.REPRODUCED and C.verdict(2.1, "not worse", 2) == C.CONTRADICTED
    assert C.verdict(float("nan"), "worse", 2) == C.MISSING
    table = {("bf16", "adamw", "clean"): {0: 4.00, 1: 4.02, 2: 3.98}, ("mxfp4", "adamw", "clean"): {0: 4.10, 1: 4.08}}
    rows = C.judge(table, sigma=0.02, k=2)
    (r,) = [x for x in rows if x["claim"] == "MXFP4 is worse than BF16"]
    assert r["sigmas"] == pytest.approx((4.09 - 4.0) / (0.02 * math.sqrt(1 / 2 + 1 / 3)))
    assert r["verdict"] == C.REPRODUCED and r["paired_rel_gaps"] == pytest.approx({0: 0.025, 1: 0.06 / 4.02})
    assert len(rows) == 1  # claims whose cells did not run are left out
    # paired: d = (0.10, 0.06), pooled s_d = 0.02 sqrt(2) from this claim alone; z = 0.08 / (s_d / sqrt(2))
    assert r["paired_z"] == pytest.approx(4.0)
    assert C.pooled_paired_std([[1.0, 3.0], [5.0], [2.0, 2.0, 5.0]]) == pytest.approx(math.sqrt((2 + 6) / 3))
    assert math.isnan(C.pooled_paired_std([[1.0], []]))


def test_corpus_pieces():
    docs = ["\n".join(f"line {i} of doc {d}: x = {i * d}" for i in range(40)) for d in range(3)]
    pieces = sft_tasks.corpus_pieces(docs, 20, seed=1, prompt_chars=30, response_chars=12)
    assert len(pieces) == 20 and pieces == sft_tasks.corpus_pieces(docs, 20, seed=1, prompt_chars=30, response_chars=12)
    for p, r in pieces:
        assert len(p) == 30 and len(r) == 12 and p.startswith("line ")  # windows start at a line start
        assert any(p + r in d for d in docs)
    with pytest.raises(ValueError, match="long enough"):
        sft_tasks.corpus_pieces(["short"], 1, seed=0)


def test_smooth():
    assert plots.smooth([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [(1, 1.0), (2, 2.0), (3, 4.0)]


def test_cli_settings():
    from lowbit.report import cli

    args = cli.parser().parse_intermixed_args(["convergence", "optim.weight_decay=0.1", "--steps", "50", "--seeds", "4",
                                               "--recipes", "bf16", "mxfp4"])
    s = cli.settings_of(args)
    assert (s.steps, s.baseline_seeds, s.recipes, s.overrides) == (50, 4, ("bf16", "mxfp4"), ("optim.weight_decay=0.1",))
    smoke = cli.settings_of(cli.parser().parse_intermixed_args(["convergence", "--smoke"]))
    assert smoke.steps == 5 and smoke.spikes.at(2) and smoke.spikes.at(4)  # spikes land inside 5 steps
    for bad in (["--optimizers", "sgd"], ["--recipes", "bf16", "nvfp3"], ["--objectives", "mse"]):
        with pytest.raises(SystemExit):
            cli.parser().parse_intermixed_args(["convergence", *bad])
