"""Suite `attention`: lowbit.attention.block_sparse_attention against dense causal SDPA.

Cases: batch 1, 8 heads of 128 (CPU, fp32; seq 4k and 8k) or 32 heads of 128 (GPU, bf16; seq 32k),
block 64, causal; block masks at target densities 50 %, 20 %, 10 % of the causal blocks, chosen per
query block by `lowbit.attention.by_density` from random scores (the kernel's cost depends on how
many blocks are selected, not on which). work = the flops of the selected blocks (QK^T and PV,
4 * bs^2 * head_dim per block); limit: fp32 `torch.mm` on CPU, the datasheet bf16 peak on GPU.
Peer `sdpa`: `F.scaled_dot_product_attention(is_causal=True)`, dense, on the same inputs (flash
attention on GPU); speedup_vs_sdpa = SDPA p50 / block-sparse p50, both timed in the same run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import block_sparse_attention, by_density, density
from ..backends import resolve
from .suite import Context, Row

DESCRIPTION = "block-sparse attention at 50/20/10 % block density vs dense causal SDPA (seq 4k/8k CPU, 32k GPU)"
PARAMS = ("seq", "target_density", "density", "block")
PEERS = {"sdpa": None}
BLOCK = 64
DENSITIES = (0.5, 0.2, 0.1)


def _setup(ctx: Context):
    if ctx.device == "cuda":
        seqs, heads, dtype = ((4096,) if ctx.quick else (32768,)), 32, torch.bfloat16
    else:
        seqs, heads, dtype = ((1024, 2048) if ctx.quick else (4096, 8192)), 8, torch.float32
    return seqs, heads, 128, dtype


def run(ctx: Context) -> list[Row]:
    backend = resolve("block_sparse_attention", ctx.device, ctx.backend)  # raises if --backend cannot run it
    seqs, heads, head_dim, dtype = _setup(ctx)
    dev = torch.device(ctx.device)
    limit = "peak_bf16_TFLOP/s" if ctx.device == "cuda" else "fp32_mm_TFLOP/s"
    rows = []
    g = torch.Generator().manual_seed(0)
    for seq in seqs:
        q, k, v = (torch.randn(1, heads, seq, head_dim, generator=g).to(dev, dtype) for _ in range(3))
        ctx.console(f"attention: dense SDPA, seq {seq}")
        dense = ctx.time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), f"sdpa {seq}",
                         min_runs=3, min_time=0.0)
        n = -(-seq // BLOCK)
        scores = torch.rand(1, heads, n, n, generator=g).to(dev)
        for target in DENSITIES:
            mask = by_density(scores, target)
            measured = density(mask)
            flops = 4.0 * float(mask.sum()) * BLOCK * BLOCK * head_dim
            ctx.console(f"attention: block-sparse, seq {seq}, density {measured:.3f}")
            t = ctx.time(lambda: block_sparse_attention(q, k, v, mask, BLOCK, True, backend=backend),
                         f"block-sparse {seq} {target}", min_runs=3, min_time=0.0)
            rows.append(Row(case=f"seq {seq} density {target:g}", timing=t, shape=f"1x{heads}x{seq}x{head_dim}",
                            dtype=str(dtype).replace("torch.", ""), work=flops, unit="TFLOP/s", limit=limit,
                            peers={"sdpa": dense}, backend=backend,
                            params={"seq": seq, "target_density": target, "density": round(measured, 4),
                                    "block": BLOCK}))
    return rows
