"""convert / unconvert: swap a model's Linear layers for LowBitLinear in place, and back.

Works on any module tree: `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight [in, out])
are replaced by LowBitLinear sharing the same Parameter objects, so optimizers, state dicts and
`save_pretrained` keep working. Layers stay in high precision (untouched nn.Linear) when
  * their name matches `skip` (left alone) or `keep_high_precision` (default: the recipe's rule:
    the output head, plus the last `keep_last_fraction` of the transformer blocks),
  * their feature dims do not divide the recipe's blocks (an error instead with `strict=True`).
Patterns are fnmatch globs over module names; a pattern also matches everything under that name.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
import warnings
from dataclasses import dataclass, field

from torch import nn

from .linear import LowBitLinear
from .recipe import Recipe, get_recipe
from .smooth_swiglu import SmoothSwiGLU, is_swiglu_mlp

log = logging.getLogger(__name__)

HEAD_NAMES = ("lm_head", "embed_out", "output", "head", "score")
_BLOCK = re.compile(r"^(.*?\b(?:layers|layer|h|blocks|block))\.(\d+)(?:\.|$)")


@dataclass
class ConversionSummary:
    """What `convert` did: converted layer names, and for each layer kept in high precision, why."""

    recipe: str
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    smoothed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lowbit.nn.convert: recipe {self.recipe}: {len(self.converted)} Linear layers converted, "
                 f"{len(self.kept)} kept in high precision" + (f", {len(self.smoothed)} SmoothSwiGLU" if self.smoothed else "")]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def _is_conv1d(m: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (without importing transformers): y = x @ W + b, W [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def _last_blocks(names: list[str], fraction: float) -> set[str]:
    """Names inside the last ceil(fraction * n) blocks of the largest `...layers.<i>` stack."""
    if fraction <= 0:
        return set()
    stacks: dict[str, set[int]] = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not stacks:
        return set()
    prefix, idx = max(stacks.items(), key=lambda kv: len(kv[1]))
    n_keep = math.ceil(fraction * len(idx) - 1e-9)
    keep = set(sorted(idx)[len(idx) - n_keep:])
    return {n for n in names if (m := _BLOCK.match(n)) and m.group(1) == prefix and int(m.group(2)) in keep}


def _head_names(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """Output heads: by name, or a Linear whose weight is tied to an embedding."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n for n, m in linears.items() if n.rsplit(".", 1)[-1] in HEAD_NAMES or id(m.weight) in tied}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def convert(model: nn.Module, recipe: str | Recipe, *, skip=None, keep_high_precision=None, strict: bool = False,
            smooth_swiglu: bool = False) -> nn.Module:
    """Swap the Linear layers of `model` for LowBitLinear running `recipe`, in place; returns `model`.

    skip: patterns of layers to leave untouched. keep_high_precision: patterns of layers to keep in
    high precision; None means the recipe's default (head + last `keep_last_fraction` of blocks).
    strict: raise instead of keeping a layer whose shape the recipe cannot quantize.
    smooth_swiglu: wrap SwiGLU MLPs (Llama / Qwen2) whose down-projection was converted.
    The summary is `model.lowbit_conversion` (a ConversionSummary; print it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    if isinstance(keep_high_precision, str):
        keep_high_precision = [keep_high_precision]
    if any(isinstance(m, LowBitLinear) for m in model.modules()):
        raise ValueError("model: already converted (it holds LowBitLinear layers); call lowbit.nn.unconvert first")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear or _is_conv1d(m)}
    default_keep: dict[str, str] = {}
    keep_patterns = []
    if keep_high_precision is None:
        for n in _last_blocks(list(linears), recipe.keep_last_fraction):
            default_keep[n] = f"{recipe.name} keeps the last {recipe.keep_last_fraction:.0%} of blocks in high precision"
        if recipe.keep_lm_head:
            for n in _head_names(model, linears):
                default_keep[n] = "output head (kept in high precision)"
    else:
        keep_patterns = list(keep_high_precision)
    summary = ConversionSummary(recipe.name)
    for name, m in linears.items():
        conv1d = _is_conv1d(m)
        in_f, out_f = (m.weight.shape[0], m.weight.shape[1]) if conv1d else (m.in_features, m.out_features)
        if _matches(name, skip):
            summary.kept[name] = "skip list"
            continue
        if name in default_keep:
            summary.kept[name] = default_keep[name]
            continue
        if _matches(name, keep_patterns):
            summary.kept[name] = "keep_high_precision"
            continue
        problem = recipe.shape_problem(in_f, out_f)
        if problem:
            if strict:
                raise ValueError(f"{name}: recipe {recipe.name} cannot quantize Linear({in_f}, {out_f}): {problem}")
            summary.kept[name] = f"shape: {problem}"
            log.warning("lowbit.nn.convert: %s stays in high precision: %s", name, problem)
            continue
        _set_submodule(model, name, LowBitLinear.from_linear(m, recipe, transposed_weight=conv1d))
        summary.converted.append(name)
    if smooth_swiglu:
        for name, m in list(model.named_modules()):
            if is_swiglu_mlp(m) and isinstance(m.down_proj, LowBitLinear) and m.down_proj.recipe.quantizes:
                _set_submodule(model, name, SmoothSwiGLU(m))
                summary.smoothed.append(name)
    if not summary.converted:  # a model without Linear layers, or all of them kept: the recipe does nothing
        why = f"all {len(linears)} were kept in high precision" if linears else "the model has no nn.Linear / Conv1D"
        warnings.warn(f"lowbit.nn.convert: recipe {recipe.name} converted no layer: {why}", UserWarning, stacklevel=2)
    model.lowbit_conversion = summary
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Put plain nn.Linear / Conv1D layers (sharing the same Parameters) back in place of LowBitLinear."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SmoothSwiGLU):
            orig = m.original
            orig.gate_proj, orig.up_proj, orig.down_proj = m.gate_proj, m.up_proj, m.down_proj
            _set_submodule(model, name, orig)
    for name, m in list(model.named_modules()):
        if not isinstance(m, LowBitLinear):
            continue
        if m.transposed_weight:
            from transformers.pytorch_utils import Conv1D  # lazy: only GPT-2-style models need transformers

            new = Conv1D(m.out_features, m.in_features)
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        new.weight = m.weight
        new.bias = m.bias
        _set_submodule(model, name, new)
    if hasattr(model, "lowbit_conversion"):
        del model.lowbit_conversion
    return model
