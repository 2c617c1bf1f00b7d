"""Recipe ablations for the ladder, derived from the built-in recipes with `dataclasses.replace`.

    nvfp4-no-rht   nvfp4 without the random Hadamard transform on the wgrad operands
    nvfp4-no-sr    nvfp4 with round-to-nearest on the gradients instead of stochastic rounding

`lowbit.train` takes a recipe by name or by YAML path, so each variant is written as a YAML file
(`write`) whose round trip through `lowbit.nn.recipe.load_recipe` gives the same Recipe back.
"""
from __future__ import annotations

import dataclasses
import os

import yaml

from ..nn.recipe import OPERANDS, RECIPES, Recipe, load_recipe


def without_hadamard(recipe: Recipe, name: str) -> Recipe:
    ops = {n: dataclasses.replace(getattr(recipe, n), hadamard=None) for n in OPERANDS if getattr(recipe, n) is not None}
    return dataclasses.replace(recipe, name=name, description=f"{recipe.name} without the random Hadamard transform",
                               **ops)


def nearest_only(recipe: Recipe, name: str) -> Recipe:
    ops = {n: dataclasses.replace(getattr(recipe, n), rounding="nearest") for n in OPERANDS
           if getattr(recipe, n) is not None}
    return dataclasses.replace(recipe, name=name, description=f"{recipe.name} with round-to-nearest everywhere "
                               "(no stochastic rounding)", **ops)


VARIANTS = {
    "nvfp4-no-rht": lambda: without_hadamard(RECIPES["nvfp4"], "nvfp4-no-rht"),
    "nvfp4-no-sr": lambda: nearest_only(RECIPES["nvfp4"], "nvfp4-no-sr"),
}


def recipe_of(name: str) -> Recipe:
    if name in RECIPES:
        return RECIPES[name]
    if name in VARIANTS:
        return VARIANTS[name]()
    raise ValueError(f"recipe: unknown {name!r}; expected one of {list(RECIPES) + list(VARIANTS)}")


def write(name: str, folder: str) -> str:
    """The value for `quant.recipe`: the built-in name, or the path of the variant's YAML file."""
    if name in RECIPES:
        return name
    recipe = recipe_of(name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
    if load_recipe(path) != recipe:
        raise RuntimeError(f"{path}: the YAML does not round-trip to the {name} recipe")
    return path
