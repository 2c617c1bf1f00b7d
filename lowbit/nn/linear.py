"""LowBitLinear: a drop-in nn.Linear whose three GEMMs run in a recipe's precision.

The parameters are plain `nn.Parameter`s named and shaped as nn.Linear's (or as a transformers
Conv1D's, [in, out], with `transposed_weight=True`), so the state dict loads into plain PyTorch and
back, and DeepSpeed ZeRO can partition them. The quantized weight is cached and reused until the
weight changes: the cache key is the weight's storage, its version counter (bumped by every in-place
update, e.g. `optimizer.step()` or `load_state_dict`) and a global counter that every
`torch.optim` optimizer step increments, so gradient-accumulation micro-batches share one
quantization. An update that bypasses both (writing through `.data`) must call `clear_weight_cache`.
Weights partitioned by DeepSpeed ZeRO-3 are not cached (the cache would hold the whole weight).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .functional import LowBitLinearFunction, QuantizedWeight, quantize_weight
from .recipe import Recipe, get_recipe

_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


class LowBitLinear(nn.Module):
    """y = x W^T + b with fprop / dgrad / wgrad in the precision `recipe` names (fp32 accumulation).

    recipe: a `Recipe`, a built-in name ("bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-blockwise",
        "mxfp8", "mxfp4", "nvfp4", "fp4-dge", "int4") or a recipe YAML path.
    transposed_weight: store W as [in, out] (transformers' Conv1D layout) instead of [out, in].
    Output dtype: the input's, or the autocast dtype when autocast is on (as nn.Linear).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe="bf16", *,
                 transposed_weight: bool = False, device=None, dtype=None, strict: bool = True):
        super().__init__()
        if not (isinstance(in_features, int) and in_features > 0):
            raise ValueError(f"in_features: expected a positive int, got {in_features!r}")
        if not (isinstance(out_features, int) and out_features > 0):
            raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
        self.in_features, self.out_features = in_features, out_features
        self.transposed_weight = transposed_weight
        self.recipe = get_recipe(recipe)
        if strict:
            problem = self.recipe.shape_problem(in_features, out_features)
            if problem:
                raise ValueError(f"recipe: {self.recipe.name} cannot run a Linear({in_features}, {out_features}): {problem}")
        shape = (in_features, out_features) if transposed_weight else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._cache_key = None
        self._cache: QuantizedWeight | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (Conv1D layout: the same distribution, transposed storage)."""
        w = self.weight.t() if self.transposed_weight else self.weight
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Module, recipe, *, transposed_weight: bool = False) -> "LowBitLinear":
        """A LowBitLinear sharing `linear`'s parameters (no copy)."""
        w = linear.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if transposed_weight else (w.shape[1], w.shape[0])
        with torch.device("meta"):
            new = cls(in_f, out_f, bias=linear.bias is not None, recipe=recipe, transposed_weight=transposed_weight)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def clear_weight_cache(self) -> None:
        self._cache_key, self._cache = None, None

    def _weight_2d(self) -> torch.Tensor:
        """W as [out, in] (a view for the Conv1D layout)."""
        return self.weight.t() if self.transposed_weight else self.weight

    def quantized_weight(self, w: torch.Tensor | None = None) -> QuantizedWeight:
        """The recipe's quantizations of W, from the cache while the weight is unchanged.

        `w` replaces the module's weight (e.g. a rescaled one); such weights are not cached.
        """
        if w is not None:
            return quantize_weight(w, self.recipe)
        w = self._weight_2d()
        if hasattr(self.weight, "ds_tensor"):
            # a DeepSpeed ZeRO-3 partitioned weight: a cached copy would keep the whole (quantized)
            # weight on every rank between steps, which is what ZeRO-3 exists to avoid
            return quantize_weight(w.detach(), self.recipe)
        key = (w.data_ptr(), w._version, _optimizer_steps, w.dtype, w.device, tuple(w.shape))
        if key != self._cache_key:
            self._cache = quantize_weight(w.detach(), self.recipe)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor, *, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
        """`weight_scale` ([in_features]) multiplies W's input channels (SmoothSwiGLU folds its scale here)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features} (in_features), got shape {tuple(x.shape)}")
        w = self._weight_2d()
        if weight_scale is not None:
            w = w * weight_scale.to(w.dtype)
        if not self.recipe.quantizes:
            return F.linear(x, w, self.bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        wq = self.quantized_weight(w if weight_scale is not None else None)
        with torch.autocast(dev, enabled=False):
            y = LowBitLinearFunction.apply(x.reshape(-1, self.in_features), w, self.bias, self.recipe, wq, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = ", transposed_weight=True" if self.transposed_weight else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"recipe={self.recipe.name}{layout}")


__all__ = ["LowBitLinear", "Recipe"]
