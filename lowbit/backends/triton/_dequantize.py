"""Decode quantized storage (FP8, MX, NVFP4; FP4 unpacked from nibbles) and apply the block scales."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import ELEMENT_LAYOUT, decode_element, exp2_int, fdiv_rn

KIND = {"fp8": 0, "mx": 1, "nvfp4": 2}
TILE, MAX_TK = 2048, 128


@triton.jit
def _dequantize_kernel(data_ptr, scale_ptr, gs_ptr, out_ptr, R, K, br, bk, nbk, KIND: tl.constexpr,
                       EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, PACKED: tl.constexpr,
                       TR: tl.constexpr, TK: tl.constexpr):
    n_cols = tl.cdiv(K, TK)  # flat grid: axes 1 and 2 stop at 65535 programs
    rows = (tl.program_id(0) // n_cols).to(tl.int64) * TR + tl.arange(0, TR)
    cols = (tl.program_id(0) % n_cols).to(tl.int64) * TK + tl.arange(0, TK)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    if PACKED:
        byte = tl.load(data_ptr + rows[:, None] * (K // 2) + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
        code = (byte >> ((cols & 1) * 4).to(tl.int32)[None, :]) & 0xF
    else:
        code = tl.load(data_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0).to(tl.int32)
    q = decode_element(code, EBITS, MBITS, BIAS)
    blk = (rows // br)[:, None] * nbk + (cols // bk)[None, :]
    if KIND == 0:
        out = q * tl.load(scale_ptr + blk, mask=mask, other=1.0)
    elif KIND == 1:
        e = tl.load(scale_ptr + blk, mask=mask, other=127).to(tl.int32) - 127
        out = q * tl.where(e == 128, float("nan"), exp2_int(tl.minimum(e, 127)))
    else:
        s = decode_element(tl.load(scale_ptr + blk, mask=mask, other=0x38).to(tl.int32), 4, 3, 7)
        out = fdiv_rn(q * s, tl.load(gs_ptr + blk * 0, mask=mask, other=1.0))
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], out, mask=mask)


def launch_plan(R: int, K: int) -> tuple[tuple[int], int, int]:
    """(grid, TR, TK) for an [R, K] output: TILE elements per program, one flat grid axis."""
    tk = min(MAX_TK, max(2, triton.next_power_of_2(K)))
    tr = min(TILE // tk, triton.next_power_of_2(R))
    return (triton.cdiv(R, tr) * triton.cdiv(K, tk),), tr, tk


def smem_bytes() -> int:
    """Upper bound of the kernel's shared memory: one fp32 TILE through a layout change."""
    return TILE * 4


def dequantize(data, scale, global_scale, fmt, block, K, dtype):
    R = data.shape[0]
    br, bk = block
    dev = data.device
    out = torch.empty((R, K), dtype=torch.float32, device=dev)
    if R and K:
        raw = data.contiguous().view(torch.uint8)
        sc = scale.contiguous()
        if sc.dtype == torch.float8_e4m3fn:
            sc = sc.view(torch.uint8)
        gs = global_scale.to(device=dev, dtype=torch.float32).reshape(1)
        grid, tr, tk = launch_plan(R, K)
        _dequantize_kernel[grid](
            raw, sc, gs, out, R, K, br, bk, K // bk, KIND[fmt.kind], *ELEMENT_LAYOUT[fmt.elem.name], fmt.packed,
            tr, tk, enable_fp_fusion=False)
    return out if dtype == torch.float32 else out.to(dtype)
