"""Recipes: the built-ins, their YAML files, and the validation of hand-written ones."""
import dataclasses
from pathlib import Path

import pytest

import lowbit.nn as N
from lowbit.nn.recipe import Operand, Recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "recipes"


@pytest.mark.parametrize("name", N.RECIPE_NAMES)
def test_yaml_matches_builtin(name):
    assert N.get_recipe(CONFIGS / f"{name}.yaml") == N.RECIPES[name]


def test_every_yaml_is_a_builtin():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(N.RECIPE_NAMES)


def test_issue_recipes_present():
    for name in ("bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-blockwise", "mxfp8", "mxfp4", "nvfp4", "fp4-dge"):
        assert name in N.RECIPES


def test_nvfp4_is_the_papers_recipe():
    r = N.RECIPES["nvfp4"]
    assert r.fprop_input == Operand("nvfp4", (1, 16)) and r.fprop_weight.block == (16, 16)
    assert r.dgrad_grad.rounding == r.wgrad_grad.rounding == "stochastic"
    assert r.fprop_input.rounding == r.fprop_weight.rounding == r.wgrad_input.rounding == "nearest"
    assert r.wgrad_grad.hadamard == r.wgrad_input.hadamard == 16
    assert r.fprop_input.hadamard is None and r.dgrad_grad.hadamard is None
    assert r.keep_last_fraction == 0.15 and r.keep_lm_head


def test_fp8_tensorwise_grads_are_e5m2():
    r = N.RECIPES["fp8-tensorwise"]
    assert r.dgrad_grad.fmt == r.wgrad_grad.fmt == "fp8_e5m2"
    assert r.fprop_input.fmt == r.fprop_weight.fmt == "fp8_e4m3" and r.fprop_input.tensorwise


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown recipe 'fp6'.*nvfp4"):
        N.get_recipe("fp6")


def test_one_sided_gemm_rejected():
    with pytest.raises(ValueError, match="fprop_weight.*set both"):
        Recipe("x", fprop_input=Operand("mxfp8"))


def test_hadamard_must_match_within_a_gemm():
    with pytest.raises(ValueError, match="wgrad_input.hadamard"):
        dataclasses.replace(N.RECIPES["nvfp4"], wgrad_input=Operand("nvfp4", (1, 16)))


def test_dge_needs_fp4_weights():
    with pytest.raises(ValueError, match="weight_estimator"):
        dataclasses.replace(N.RECIPES["mxfp8"], weight_estimator="dge")


@pytest.mark.parametrize("kw, match", [
    (dict(fmt="fp7"), "unknown format"),
    (dict(fmt="mxfp8", rounding="up"), "rounding"),
    (dict(fmt="mxfp8", hadamard=24), "hadamard"),
    (dict(fmt="mxfp8", block=(0, 32)), "block"),
])
def test_bad_operand(kw, match):
    with pytest.raises(ValueError, match=match):
        Operand(**kw)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nfprop_inptu: {fmt: mxfp8}\n")
    with pytest.raises(ValueError, match="r.yaml.*unknown key.*fprop_inptu"):
        N.get_recipe(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        N.get_recipe(tmp_path / "missing.yaml")


def test_shape_problem():
    r = N.RECIPES["fp8-blockwise"]
    assert r.shape_problem(256, 384) is None
    assert "fprop_input" in r.shape_problem(200, 384)
    assert "fprop_weight" in r.shape_problem(256, 200)
    assert N.RECIPES["fp8-tensorwise"].shape_problem(7, 3) is None
    assert N.RECIPES["nvfp4"].shape_problem(48, 24) is not None  # 24 is not a multiple of the 16x16 weight tile
