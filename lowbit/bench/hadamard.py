"""Suite `hadamard`: lowbit.hadamard, the random Hadamard transform of 1 x b blocks along the last dim.

Input: each selected model's activation, tokens x hidden, in bf16 and fp32; blocks b = 16 (the NVFP4
recipe's RHT) and the largest power of two dividing hidden (up to 4096; QuaRot-style when it is
hidden itself). work = bytes read + written; the limit is `Tensor.copy_` bandwidth.
Peers (the same transform, same output):
  torch                    x.view(-1, b) @ (diag(s) H_b / sqrt(b)) with torch.matmul in fp32
  fast_hadamard_transform  Dao-AILab's CUDA kernel with the signs applied first (GPU only)
"""
from __future__ import annotations

import math

import torch

import lowbit

from .harness import NOT_APPLICABLE
from .suite import Context, Row

DESCRIPTION = "lowbit.hadamard: random Hadamard transform, b=16 and b=hidden (vs torch matmul, fast-hadamard-transform)"
PARAMS = ("block",)
PEERS = {"torch": None, "fast_hadamard_transform": "fast_hadamard_transform"}
SEED = 1


def sylvester(b: int) -> torch.Tensor:
    """The b x b Sylvester Hadamard matrix (entries +-1)."""
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def torch_peer(x: torch.Tensor, b: int, signs: torch.Tensor):
    """The same random Hadamard transform as one dense fp32 matmul per block."""
    m = (signs[:, None] * sylvester(b).to(x.device)) / math.sqrt(b)

    def f():
        return (x.float().reshape(-1, b) @ m).reshape(x.shape).to(x.dtype)
    return f


def fht_peer(x: torch.Tensor, b: int, signs: torch.Tensor):
    """fast_hadamard_transform.hadamard_transform on the signed blocks, or a status string."""
    try:  # an optional peer, reported "absent" when it does not import
        from fast_hadamard_transform import hadamard_transform
    except Exception:
        return "absent"
    if x.device.type != "cuda":
        return NOT_APPLICABLE

    def f():
        return hadamard_transform((x.reshape(-1, b) * signs.to(x.dtype)), scale=1 / math.sqrt(b)).reshape(x.shape)
    return f


def signs_of(b: int, seed: int, device) -> torch.Tensor:
    """lowbit's +-1 sign vector for `seed`: the transform of the identity's first row times sqrt(b)."""
    e = torch.eye(b, device=device)
    rows = lowbit.hadamard(e, b, seed=seed) * math.sqrt(b)
    return torch.diagonal(rows @ sylvester(b).to(device)) / b


def blocks_for(hidden: int) -> list[int]:
    big = min(4096, hidden & -hidden)
    return sorted({16, big}) if big >= 16 else []


def run(ctx: Context) -> list[Row]:
    backend = ctx.backend_for("hadamard")
    rows = []
    for model in ctx.models(default=("llama-8b",), quick=("llama-125m",)):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(ctx.tokens, model.hidden, device=ctx.device).to(dtype)
            for b in blocks_for(model.hidden):
                def fn():
                    return lowbit.hadamard(x, b, seed=SEED, backend=ctx.backend)
                t = ctx.time(fn, f"hadamard {b}")
                signs = signs_of(b, SEED, ctx.device)
                peers = {"torch": ctx.time(torch_peer(x, b, signs), "torch")}
                f = fht_peer(x, b, signs)
                peers["fast_hadamard_transform"] = f if isinstance(f, str) else ctx.time(f, "fht")
                rows.append(Row(f"hadamard b={b}", t, shape=f"{ctx.tokens}x{model.hidden}",
                                dtype=str(dtype).replace("torch.", ""), work=2 * x.numel() * x.element_size(),
                                unit="GB/s", limit="copy_GB/s", peers=peers, params={"block": b}, backend=backend))
                ctx.console(f"hadamard {model.name} {dtype} b={b}: p50 {t.p50 * 1e3:.2f} ms")
    return rows
