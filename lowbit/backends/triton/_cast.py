"""Unscaled saturating cast to bf16 / fp16 / fp8 (nearest-even or stochastic), one element per lane."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import ELEMENT_CODES, as_kernel_input, load_fp32, random_bits, round_to_code

BLOCK = 1024
BLOCK_INTERPRETED = 16384  # the interpreter runs programs one after another: fewer, larger ones


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n, seed, STOCHASTIC: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                 MAX_CODE: tl.constexpr, INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
                 SIGN_SHIFT: tl.constexpr, WIDE: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = load_fp32(x_ptr, offs, mask, BF16)
    rbits = tl.zeros([BLOCK], dtype=tl.uint32)
    if STOCHASTIC:
        rbits = random_bits(seed, offs)
    code = round_to_code(v, rbits, STOCHASTIC, MBITS, BIAS, MAX_CODE, INF_CODE, NAN_CODE, SIGN_SHIFT)
    if WIDE:
        code = tl.where(code >= 0x8000, code - 0x10000, code)
        tl.store(out_ptr + offs, code.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)


def launch_plan(n: int, on_gpu: bool) -> tuple[tuple[int], int]:
    """(grid, BLOCK) for n elements: one flat axis (n / BLOCK programs stays far below 2^31 - 1)."""
    block = BLOCK if on_gpu else BLOCK_INTERPRETED
    return (triton.cdiv(n, block),), block


def smem_bytes() -> int:
    return 0  # elementwise: no reduction, no layout change


def cast(x: torch.Tensor, elem_name: str, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    xk, bf16 = as_kernel_input(x)
    wide = torch.empty((), dtype=dtype).element_size() == 2
    out = torch.empty(x.shape, dtype=torch.int16 if wide else torch.uint8, device=x.device)
    n = x.numel()
    if n:
        grid, block = launch_plan(n, x.is_cuda)
        _cast_kernel[grid](xk, out, n, seed, rounding == "stochastic", *ELEMENT_CODES[elem_name], wide, bf16, block,
                           enable_fp_fusion=False)
    return out.view(dtype)
