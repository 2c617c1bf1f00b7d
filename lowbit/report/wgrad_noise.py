"""Bias and noise of one Linear's weight gradient under a recipe: what the NVFP4 ablations change.

For fixed x [T, in] and dy [T, out], each draw runs LowBitLinear forward and backward with a fresh
torch seed (fresh rounding and Hadamard seeds, as every training step draws) and keeps dW. Against
the exact dy^T x:

  bias = |mean over draws of dW - exact| / |exact|   (Frobenius; its floor from the finite number of
         draws is noise / sqrt(draws))
  noise = RMS over draws and entries of (dW - mean dW) / RMS(exact)
  error = RMS of (dW - exact) / RMS(exact), the two together

`streams` repeats NVFP4's wgrad GEMM with the stochastic rounding of dy^T drawn from an unrelated
seed instead of the seed that also gives the Hadamard signs: equal numbers mean the rounding and
sign streams do not interact.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..nn.functional import lowbit_linear
from .variants import recipe_of

RECIPES = ("nvfp4", "nvfp4-no-rht", "nvfp4-no-sr", "mxfp4", "int4")


def operands(T: int = 2048, fan_in: int = 256, fan_out: int = 256, seed: int = 0):
    """x ~ N(0, 1); dy with a log-normal scale per token, as a language model's gradients vary by position."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, fan_in, generator=g)
    dy = torch.randn(T, fan_out, generator=g) * torch.exp(torch.randn(T, 1, generator=g)) * 1e-3
    w = torch.randn(fan_out, fan_in, generator=g) * fan_in ** -0.5
    return x, dy, w


def _stats(grads: torch.Tensor, exact: torch.Tensor) -> dict:
    mean = grads.mean(0)
    rms = exact.pow(2).mean().sqrt()
    noise = (grads - mean).pow(2).mean().sqrt() / rms
    return {"bias": float((mean - exact).norm() / exact.norm()), "noise": float(noise),
            "error": float((grads - exact).pow(2).mean().sqrt() / rms),
            "bias_floor": float(noise / math.sqrt(grads.shape[0]))}


def measure(recipe: str, draws: int = 32, **shape) -> dict:
    x, dy, w0 = operands(**shape)
    r = recipe_of(recipe)
    grads = []
    with torch.random.fork_rng():
        for d in range(draws):
            torch.manual_seed(1000 + d)
            w = w0.clone().requires_grad_()
            lowbit_linear(x, w, None, r).backward(dy)
            grads.append(w.grad)
    return _stats(torch.stack(grads), dy.t() @ x)


def streams(draws: int = 32, **shape) -> dict:
    """NVFP4's wgrad GEMM with the dy^T rounding seed equal to (as trained) or apart from the Hadamard seed."""
    x, dy, _ = operands(**shape)
    out = {}
    for name, offset in (("shared seed", 0), ("separate seeds", 0x5DEECE66D)):
        grads = []
        for d in range(draws):
            seed = 1000 + d
            xt = ops.dequantize(ops.quantize(x.t().contiguous(), "nvfp4", block=(1, 16), seed=seed, hadamard=16))
            rotated = ops.hadamard(dy.t().contiguous(), 16, seed=seed)
            dyt = ops.dequantize(ops.quantize(rotated, "nvfp4", block=(1, 16), rounding="stochastic",
                                              seed=seed + offset))
            grads.append(dyt.float() @ xt.float().t())
        out[name] = _stats(torch.stack(grads), dy.t() @ x)
    return out


def report(recipes=RECIPES, draws: int = 32) -> dict:
    return {"recipes": {r: measure(r, draws) for r in recipes}, "streams": streams(draws), "draws": draws}


def markdown(res: dict) -> list[str]:
    L = ["## Weight-gradient estimator", "",
         f"One Linear (x [2048, 256] ~ N(0, 1), dy [2048, 256] with a log-normal scale per token), {res['draws']} "
         "draws of fresh rounding and Hadamard seeds (`lowbit/report/wgrad_noise.py`): bias of the mean dW, noise "
         "of one draw, and their total, relative to the exact dy^T x. The bias floor is what the finite number "
         "of draws leaves of pure noise.", "",
         "| recipe | bias | bias floor | noise | error |", "|---|---|---|---|---|"]
    for r, d in res["recipes"].items():
        L.append(f"| {r} | {d['bias']:.4f} | {d['bias_floor']:.4f} | {d['noise']:.4f} | {d['error']:.4f} |")
    s = res["streams"]
    L += ["", "NVFP4's wgrad with the dy^T rounding drawn from the Hadamard seed (as trained) or from a separate "
          "seed: " + "; ".join(f"{k}: bias {v['bias']:.4f}, noise {v['noise']:.4f}" for k, v in s.items()) + ".", ""]
    return L
