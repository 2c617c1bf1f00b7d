"""Random Hadamard transform of 1 x b slices of the last dim, in the exact operation order of the ref backend.

A block of b = 2^p elements is viewed as [b / (MID * LOW), MID, LOW]; one pass runs the butterfly
stages for the MID axis (h = LOW, 2 LOW, ..., MID * LOW / 2) on [MID, LINES] register tiles, where
a line is one run along MID. Blocks up to MAX_MID use one pass (LOW = 1); larger blocks use two,
low bits first, so the stages keep their order h = 1, 2, 4, ..., b / 2.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._rounding import as_kernel_input, hadamard_negative, load_fp32

MAX_MID = 256
TILE = 4096  # elements per program


@triton.jit
def _hadamard_pass(x_ptr, y_ptr, n_lines, seed, norm, MID: tl.constexpr, LOG_MID: tl.constexpr,
                   LOW: tl.constexpr, BLOCK: tl.constexpr, LINES: tl.constexpr, SIGNS_FIRST: tl.constexpr,
                   SIGNS_LAST: tl.constexpr, NORM: tl.constexpr, BF16: tl.constexpr):
    line = tl.program_id(0).to(tl.int64) * LINES + tl.arange(0, LINES)
    pos = tl.arange(0, MID)
    base = (line // LOW) * (MID * LOW) + (line % LOW)
    offs = base[None, :] + (pos * LOW)[:, None]
    mask = (line < n_lines)[None, :] & (pos < MID)[:, None]
    y = load_fp32(x_ptr, offs, mask, BF16)
    if SIGNS_FIRST:
        y = y * tl.where(hadamard_negative(seed, offs % BLOCK), -1.0, 1.0)
    for stage in tl.static_range(LOG_MID):  # h = 2^stage pairs y[j] with y[j + h]
        t = tl.permute(tl.reshape(y, (MID >> (stage + 1), 2, 1 << stage, LINES)), (0, 2, 3, 1))
        a, c = tl.split(t)
        t = tl.permute(tl.join(a + c, a - c), (0, 3, 1, 2))
        y = tl.reshape(t, (MID, LINES))
    if NORM:
        y = y * norm
    if SIGNS_LAST:
        y = y * tl.where(hadamard_negative(seed, offs % BLOCK), -1.0, 1.0)
    tl.store(y_ptr + offs, y, mask=mask)


def norm(block: int) -> float:
    """fp32(1/sqrt(b)): b is a power of two, so this is 2^(-p/2) rounded once to fp32."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float64).to(torch.float32))


def launch_plan(numel: int, block: int) -> list[tuple[int, int, tuple[int]]]:
    """Per pass, (MID, LINES, grid) for `numel` elements in blocks of `block`: one flat grid axis."""
    plan = []
    for mid in ([block] if block <= MAX_MID else [MAX_MID, block // MAX_MID]):
        lines = numel // mid
        per_prog = max(1, min(TILE // mid, triton.next_power_of_2(lines)))
        plan.append((mid, per_prog, (triton.cdiv(lines, per_prog),)))
    return plan


def smem_bytes() -> int:
    """Upper bound of a pass's shared memory: its fp32 tile through the butterflies' layout changes, twice."""
    return 2 * TILE * 4


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    """[R, K] (any float dtype) -> fp32 [R, K], transformed along K in blocks of `block`."""
    xk, bf16 = as_kernel_input(x)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out
    signed = seed is not None and seed >= 0
    plan = launch_plan(x.numel(), block)
    src, low = xk, 1
    for i, (mid, per_prog, grid) in enumerate(plan):
        first, last = i == 0, i == len(plan) - 1
        lines = x.numel() // mid
        _hadamard_pass[grid](
            src, out, lines, seed if signed else 0, norm(block), mid, mid.bit_length() - 1, low, block, per_prog,
            signed and first and not inverse, signed and last and inverse, last, bf16 and first,
            enable_fp_fusion=False)
        src, low = out, low * mid
    return out
