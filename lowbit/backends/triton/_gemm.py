"""Quantized GEMM C = A @ B.T read straight from the packed codes and their scales.

No dequantized copy of an operand is written: each program decodes its [BM, BK] and [BN, BK]
code tiles in registers to bf16 and sums their tl.dot products in an fp32 accumulator. (Under
the interpreter the tiles are fp32 holding the same bf16-exact values: its dot multiplies bf16
tiles as raw uint16 bits.) A bf16 / fp16 output is rounded to nearest-even with overflow to Inf,
as ref's torch cast does, by integer ops (`round_to_code`): the interpreter's downcast truncates.

Where each scale is applied, and why that keeps every product exact
-------------------------------------------------------------------
* Codes: E4M3, E5M2 and E2M1 values have at most 4 significant bits and exponents far inside
  bf16's range, so their bf16 decoding is exact, and so is the fp32 product of two bf16 values
  (8 + 8 significant bits < 24).
* MX block scales 2^e are folded into the tile before the bf16 cast: a power-of-two multiple of a
  code is exact while it stays in the normal range.
* NVFP4 block scales are folded too: an E2M1 code (2 significant bits) times an E4M3 scale
  (4 bits) needs at most 6 of bf16's 8 bits. The fp32 global scales divide the accumulator once
  at the end (div_rn: correctly rounded on the GPU as in the interpreter).
* FP8 fp32 scales are not bf16-exact in general. Constant along K (tensor-wise, row-wise, or an
  (n, n) block with n = K) they factor out of the K sum and multiply the accumulator at the end.
  Varying along K, BK divides the block width, so one K-tile meets one scale per row: its dot
  is a fresh fp32 partial, multiplied by a's row scales, then by b's column scales, then added.
* bf16 rather than the GPU's FP8 MMA: Hopper's FP8 tensor cores accumulate with fewer bits
  than fp32, which the rounding model below does not allow; bf16 MMA of exact values does.

Rounding model (u = 2^-24; values and products in fp32's normal range, as for any fp32 GEMM)
------------------------------------------------------------------------------------------
Let X_k, Y_k be the exact dequantized operands. Products are exact; each of the K terms then
goes through at most K additions (inside the dots and across K-tiles) and at most two scale
roundings (per operand one: an fp32 FP8 scale, on the partial or the accumulator, or an NVFP4
global-scale division; MX has none), so by the standard model |C - sum X_k Y_k| <=
gamma(K + 2) * sum |X_k Y_k| with gamma(n) = n u' / (1 - n u'). u' = u under round-to-nearest
(the interpreter's numpy sums); a tensor-core MMA that truncates its fp32 sums (Fasi et al.,
"Numerical behavior of NVIDIA tensor cores", 2021) has u' = 2u. ref's fp32 dequantize rounds once
per operand element and torch.mm once per product and addition, so it also lies within
gamma(K + 2) of the exact sum (with u): two results differ by the sum of their two bounds.
A bf16 / fp16 output adds one rounding of the fp32 result. The tests use exactly this bound.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._rounding import ELEMENT_CODES, ELEMENT_LAYOUT, decode_element, exp2_int, round_to_code

KIND = {"fp8": 0, "mx": 1, "nvfp4": 2}
# bf16 / fp16 outputs as `round_to_code` arguments (mbits, bias, max code, Inf code, NaN code, sign
# shift) with the max code set to Inf's, so overflow gives Inf; other dtypes are cast from fp32.
OUT_CODES = {dt: (c[0], c[1], c[3], c[3], c[4], c[5])
             for dt, c in ((torch.bfloat16, ELEMENT_CODES["bf16"]), (torch.float16, ELEMENT_CODES["fp16"]))}
BM_MAX, BN_MAX, BK_MAX, GROUP_M, STAGES = 128, 128, 64, 8, 3


@triton.jit
def _tile(data_ptr, scale_ptr, rows, ks, R, K, br, bk, nbk, KIND: tl.constexpr, EBITS: tl.constexpr,
          MBITS: tl.constexpr, BIAS: tl.constexpr, PACKED: tl.constexpr, DOT_TYPE: tl.constexpr):
    """[len(rows), len(ks)] codes -> DOT_TYPE values, MX / NVFP4 block scales folded in (exact)."""
    mask = (rows < R)[:, None] & (ks < K)[None, :]
    if PACKED:  # element 2i in the low nibble of byte i, 2i + 1 in the high nibble
        byte = tl.load(data_ptr + rows[:, None] * (K // 2) + (ks // 2)[None, :], mask=mask, other=0).to(tl.int32)
        code = (byte >> ((ks & 1) * 4).to(tl.int32)[None, :]) & 0xF
    else:
        code = tl.load(data_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0).to(tl.int32)
    q = decode_element(code, EBITS, MBITS, BIAS)
    if KIND != 0:
        blk = (rows // br)[:, None] * nbk + (ks // bk)[None, :]
        if KIND == 1:  # E8M0: 2^(byte - 127), byte 0xFF = NaN
            e = tl.load(scale_ptr + blk, mask=mask, other=127).to(tl.int32) - 127
            q = q * tl.where(e == 128, float("nan"), exp2_int(tl.minimum(e, 127)))
        else:  # E4M3 block scale (0x38 = 1.0 where masked)
            q = q * decode_element(tl.load(scale_ptr + blk, mask=mask, other=0x38).to(tl.int32), 4, 3, 7)
    return q.to(DOT_TYPE)


@triton.jit
def _fp8_scales(scale_ptr, rows, R, br, nbk, kb):
    """The fp32 scale of each row in scale column kb (1 where masked)."""
    return tl.load(scale_ptr + (rows // br) * nbk + kb, mask=rows < R, other=1.0)


@triton.jit
def _qmatmul_kernel(a_ptr, as_ptr, ag_ptr, b_ptr, bs_ptr, bg_ptr, c_ptr, M, N, K,
                    a_br, a_bk, a_nbk, b_br, b_bk, b_nbk,
                    A_KIND: tl.constexpr, A_EBITS: tl.constexpr, A_MBITS: tl.constexpr, A_BIAS: tl.constexpr,
                    A_PACKED: tl.constexpr, A_KSCALED: tl.constexpr,
                    B_KIND: tl.constexpr, B_EBITS: tl.constexpr, B_MBITS: tl.constexpr, B_BIAS: tl.constexpr,
                    B_PACKED: tl.constexpr, B_KSCALED: tl.constexpr,
                    O_CODED: tl.constexpr, O_MBITS: tl.constexpr, O_BIAS: tl.constexpr, O_MAX: tl.constexpr,
                    O_INF: tl.constexpr, O_NAN: tl.constexpr, O_SIGN: tl.constexpr, DOT_TYPE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # one flat axis of programs (no 65535 limit), grouped along M so B tiles are reused from L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = _tile(a_ptr, as_ptr, rm, ks, M, K, a_br, a_bk, a_nbk, A_KIND, A_EBITS, A_MBITS, A_BIAS, A_PACKED,
                  DOT_TYPE)
        b = _tile(b_ptr, bs_ptr, rn, ks, N, K, b_br, b_bk, b_nbk, B_KIND, B_EBITS, B_MBITS, B_BIAS, B_PACKED,
                  DOT_TYPE)
        if A_KSCALED or B_KSCALED:  # block scales along K do not factor out of the sum
            p = tl.dot(a, tl.trans(b), input_precision="ieee")
            if A_KSCALED:
                p = p * _fp8_scales(as_ptr, rm, M, a_br, a_nbk, k0 // a_bk)[:, None]
            if B_KSCALED:
                p = p * _fp8_scales(bs_ptr, rn, N, b_br, b_nbk, k0 // b_bk)[None, :]
            acc += p
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    if A_KIND == 0 and not A_KSCALED:
        acc = acc * _fp8_scales(as_ptr, rm, M, a_br, a_nbk, 0)[:, None]
    if B_KIND == 0 and not B_KSCALED:
        acc = acc * _fp8_scales(bs_ptr, rn, N, b_br, b_nbk, 0)[None, :]
    if A_KIND == 2:
        acc = tl.math.div_rn(acc, tl.load(ag_ptr))
    if B_KIND == 2:
        acc = tl.math.div_rn(acc, tl.load(bg_ptr))
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if O_CODED:
        out = round_to_code(acc, 0, False, O_MBITS, O_BIAS, O_MAX, O_INF, O_NAN, O_SIGN).to(tl.int16)
    else:
        out = acc
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], out, mask=mask)


def _operand(p, name: str, R: int, K: int):
    """Validate one operand: (pointers, (br, bk, K // bk), its constexprs, the widest K-tile its scales allow)."""
    fmt, (br, bk) = p.fmt, tuple(p.block)
    if fmt.kind not in KIND:
        raise ValueError(f"triton qmatmul: {name}: unsupported format kind {fmt.kind!r}")
    if br <= 0 or bk <= 0 or R % br or K % bk:
        raise ValueError(f"triton qmatmul: {name}: block {(br, bk)} does not tile [{R}, {K}]")
    if p.data.shape != (R, K // 2 if fmt.packed else K):
        raise ValueError(f"triton qmatmul: {name}: data {tuple(p.data.shape)} does not match [{R}, {K}] {fmt.name}")
    if p.scale.dtype != fmt.scale_dtype or p.scale.numel() != (R // br) * (K // bk):
        raise ValueError(f"triton qmatmul: {name}: scale {p.scale.dtype}{tuple(p.scale.shape)} does not match "
                         f"{fmt.name} with block {(br, bk)}")
    kscaled = fmt.kind == "fp8" and bk < K
    bk_tile = math.gcd(bk, BK_MAX) if kscaled else BK_MAX
    if bk_tile < 16:  # tl.dot needs K-tiles of 16 or more, and one fp32 scale per row per K-tile
        raise ValueError(f"triton qmatmul: {name}: FP8 block width {bk} along K is not a multiple of 16")
    scale = p.scale.contiguous().reshape(-1)
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    gs = p.global_scale.to(device=p.data.device, dtype=torch.float32).reshape(1)
    ptrs = (p.data.contiguous().view(torch.uint8), scale, gs)
    consts = (KIND[fmt.kind], *ELEMENT_LAYOUT[fmt.elem.name], fmt.packed, kscaled)
    return ptrs, (br, bk, K // bk), consts, bk_tile


def launch_plan(M: int, N: int, K: int, bk_limit: int) -> tuple[tuple[int], int, int, int]:
    """(grid, BM, BN, BK): one flat axis of BM x BN output tiles; BK at most `bk_limit` (the scales allow)."""
    bm = min(BM_MAX, max(16, triton.next_power_of_2(M)))
    bn = min(BN_MAX, max(16, triton.next_power_of_2(N)))
    bk = min(bk_limit, max(16, triton.next_power_of_2(K)))
    return (triton.cdiv(M, bm) * triton.cdiv(N, bn),), bm, bn, bk


def smem_bytes(bm: int = BM_MAX, bn: int = BN_MAX, bk: int = BK_MAX, stages: int = STAGES) -> int:
    """Upper bound of the kernel's shared memory: the bf16 operand tiles of one K step, the 1-byte code
    tiles of every pipeline stage, or the fp32 accumulator through the epilogue's layout change."""
    return max((bm + bn) * bk * 2 + stages * (bm + bn) * bk, bm * bn * 4)


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` -> a @ b.T (fp32 accumulation) in out_dtype."""
    if a.K != b.K:
        raise ValueError(f"triton qmatmul: reduction dims differ: {a.K} and {b.K}")
    M, N, K = a.data.shape[0], b.data.shape[0], a.K
    dev = a.data.device
    a_ptrs, a_blk, a_consts, a_bk = _operand(a, "a", M, K)
    b_ptrs, b_blk, b_consts, b_bk = _operand(b, "b", N, K)
    store = out_dtype if out_dtype in OUT_CODES else torch.float32
    out = torch.zeros((M, N), dtype=store, device=dev)
    codes = OUT_CODES.get(out_dtype)
    if M and N and K:
        grid, bm, bn, bk = launch_plan(M, N, K, min(a_bk, b_bk))
        # the interpreter multiplies bf16 tiles as raw uint16 bits; fp32 tiles (ieee: no TF32) hold
        # the same bf16-exact values, so give the same exact products
        dot_type = tl.bfloat16 if dev.type == "cuda" else tl.float32
        _qmatmul_kernel[grid](*a_ptrs, *b_ptrs, out if codes is None else out.view(torch.int16), M, N, K,
                              *a_blk, *b_blk, *a_consts, *b_consts, codes is not None, *(codes or (0,) * 6),
                              dot_type, bm, bn, bk, GROUP_M, num_warps=8 if bm * bn >= 128 * 128 else 4,
                              num_stages=STAGES)
    return out if store == out_dtype else out.to(out_dtype)
