"""Suite `linear`: one training step (forward + backward) of LowBitLinear per recipe vs nn.Linear.

Shapes: a square 4096 x 4096 layer and a Llama MLP projection (llama-1b gate/up, 2048 -> 5632), at
`ctx.tokens` tokens (--quick: 1024 x 1024 and llama-125m's 768 -> 2048 at 512 tokens). Each call
runs x W^T forward and dgrad + wgrad backward, including the weight's quantization (the per-step
cost without gradient accumulation); fp32 inputs. work = the three GEMMs' flops (6 M N K); the
limit is fp32 `torch.mm` throughput, so on CPU the ratio says how close the emulation gets to the
fp32 GEMMs it ends in. Column `saved_MiB`: activation memory the layer keeps for backward
(parameters and the cached weight quantization not counted).
Peers: torch (nn.Linear, fp32) for every recipe; torchao (Float8Linear, tensor-wise / row-wise)
for the fp8-tensorwise / fp8-rowwise recipes.
"""
from __future__ import annotations

import torch

from ..nn import RECIPE_NAMES, LowBitLinear
from . import harness
from .harness import NOT_APPLICABLE
from .shapes import LinearShape
from .suite import Context, Row

DESCRIPTION = "LowBitLinear forward + backward per recipe vs nn.Linear fp32 (and torchao Float8Linear)"
PARAMS = ("recipe", "saved_MiB")
PEERS = {"torch": None, "torchao": "torchao"}
TORCHAO_RECIPES = {"fp8-tensorwise": "tensorwise", "fp8-rowwise": "rowwise"}


def shapes(ctx: Context) -> list[LinearShape]:
    M = ctx.tokens
    if ctx.quick:
        square = LinearShape("square", "linear", M, 1024, 1024)
    else:
        square = LinearShape("square", "linear", M, 4096, 4096)
    mlp_model = ctx.models(default=("llama-1b",), quick=("llama-125m",))[0]
    gate = next(s for s in mlp_model.linears(M) if s.name == "gate_up_proj")
    return [square, gate]


def saved_activation_bytes(layer, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward, minus parameters and cached weights."""
    exclude = {p.data_ptr() for p in layer.parameters()}
    cache = getattr(layer, "_cache", None)
    if cache is not None:
        for q in cache:
            if q is not None:
                exclude |= {t.data_ptr() for t in (q.data, q.scale, q.global_scale) if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in exclude:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def step_fn(layer, x: torch.Tensor, dy: torch.Tensor, clear_cache: bool):
    def fn():
        if clear_cache:
            layer.clear_weight_cache()
        layer.weight.grad = None
        x.grad = None
        layer(x).backward(dy)
    return fn


def torchao_layer(recipe: str, ref: torch.nn.Linear):
    if recipe not in TORCHAO_RECIPES:
        return NOT_APPLICABLE
    try:  # an optional peer, reported "absent" when it does not import
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except Exception:
        return harness.ABSENT
    m = torch.nn.Sequential(torch.nn.Linear(ref.in_features, ref.out_features, bias=False))
    m[0].weight = torch.nn.Parameter(ref.weight.detach().clone())
    convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name(TORCHAO_RECIPES[recipe]))
    return m[0]


def run(ctx: Context) -> list[Row]:
    backend = ctx.backend_for("qmatmul")
    rows = []
    for s in shapes(ctx):
        torch.manual_seed(0)
        ref = torch.nn.Linear(s.K, s.N, bias=False, device=ctx.device)
        x = torch.randn(s.M, s.K, device=ctx.device, requires_grad=True)
        dy = torch.randn(s.M, s.N, device=ctx.device)
        slow = dict(min_runs=2, min_time=0.0) if not ctx.quick else {}
        torch_t = ctx.time(step_fn(ref, x, dy, False), "torch", **slow)
        for recipe in RECIPE_NAMES:
            layer = LowBitLinear(s.K, s.N, bias=False, recipe=recipe, device=ctx.device, strict=False)
            problem = layer.recipe.shape_problem(s.K, s.N)
            if problem:
                rows.append(Row(f"{recipe} {s.label}", None, note=f"not run: {problem}",
                                params=dict(recipe=recipe, saved_MiB="")))
                continue
            with torch.no_grad():
                layer.weight.copy_(ref.weight)
            t = ctx.time(step_fn(layer, x, dy, True), recipe, **slow)
            peer = torchao_layer(recipe, ref)
            peers = {"torch": torch_t,
                     "torchao": peer if isinstance(peer, str) else ctx.time(step_fn(peer, x, dy, False), "torchao", **slow)}
            saved = saved_activation_bytes(layer, x) / 2**20
            rows.append(Row(f"{recipe} {s.label}", t, shape=f"{s.M}x{s.N}x{s.K}", dtype="float32", work=3 * s.flops,
                            unit="TFLOP/s", limit="fp32_mm_TFLOP/s", peers=peers, backend=backend,
                            params=dict(recipe=recipe, saved_MiB=f"{saved:.1f}")))
            ctx.console(f"linear {s.label} {recipe}: {t.p50 * 1e3:.1f} ms (nn.Linear {torch_t.p50 * 1e3:.1f} ms), "
                        f"saved {saved:.1f} MiB")
    return rows
