"""Scaled quantization (FP8, MX, NVFP4): block amax -> per-block scale -> element codes.

Three launches: `_amax.block_amax_bits` (exact integer max per block, plus the tensor amax for
NVFP4), `_scale_kernel` (one lane per block: the stored scale and the fp32 factor the elements
use), `_encode_kernel` (one lane per element: scale, round, encode, pack FP4 pairs). Every fp32
operation is the one the ref backend performs, in its order; divisions are correctly rounded with
subnormals kept (`fdiv_rn`), whatever the device's flush-to-zero setting.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._amax import block_amax_bits
from ._hadamard import hadamard
from ._rounding import (ELEMENT_CODES, as_kernel_input, decode_element, exp2_int, fdiv_rn, floor_log2, is_pow2,
                        load_fp32, random_bits, round_to_code)

KIND = {"fp8": 0, "mx": 1, "nvfp4": 2}
SCALE_MODE = {"exact": 0, "floor": 1, "rceil": 2}
SCALE_LANES = 256
TILE, MAX_TK = 2048, 128
FLT_MAX = 3.4028234663852886e38
NVFP4_ENC = 2688.0  # 448 * 6


@triton.jit
def _as_float(bits):
    """amax bits -> fp32 amax, NaN for a block that held NaN or Inf."""
    return tl.where(bits >= 0x7F800000, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit
def _scale_kernel(amax_ptr, gamax_ptr, scale_ptr, factor_ptr, gs_ptr, n_blocks, KIND: tl.constexpr,
                  MODE: tl.constexpr, ELEM_MAX: tl.constexpr, EMAX: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                  LANES: tl.constexpr):
    blk = tl.program_id(0) * LANES + tl.arange(0, LANES)
    mask = blk < n_blocks
    abits = tl.load(amax_ptr + blk, mask=mask, other=0)
    amax = _as_float(abits)
    elem_max = tl.full([LANES], ELEM_MAX, tl.float32)
    if KIND == 0:
        d = fdiv_rn(amax, elem_max)
        d = tl.where(amax == 0, 1.0, d)
        d = tl.where(d < 1.1754943508222875e-38, 1.1754943508222875e-38, d)  # 2^-126; NaN passes
        if MODE != 0:
            db = d.to(tl.int32, bitcast=True)
            e = floor_log2(db)
            if MODE == 2:
                e = e + tl.where(is_pow2(db), 0, 1)
            d = tl.where(d != d, d, exp2_int(e))
        tl.store(scale_ptr + blk, d, mask=mask)
        tl.store(factor_ptr + blk, d, mask=mask)
    elif KIND == 1:
        bad = abits >= 0x7F800000
        zero = abits == 0
        safe = tl.where(bad | zero, 0x3F800000, abits)
        if MODE == 2:
            ratio = fdiv_rn(safe.to(tl.float32, bitcast=True), elem_max)
            rb = ratio.to(tl.int32, bitcast=True)
            e = tl.where(rb == 0, -127, floor_log2(tl.maximum(rb, 1)) + tl.where(is_pow2(tl.maximum(rb, 1)), 0, 1))
        else:
            e = floor_log2(safe) - EMAX
        e = tl.minimum(tl.maximum(e, -127), 127)
        e = tl.where(zero, -127, e)
        e = tl.where(bad, 128, e)
        tl.store(scale_ptr + blk, (e + 127).to(tl.uint8), mask=mask)
        inv = tl.where(e == 128, float("nan"), exp2_int(tl.minimum(-e, 127)))
        tl.store(factor_ptr + blk, inv, mask=mask)
    else:
        if HAS_GLOBAL:
            g = tl.load(gamax_ptr + blk * 0)
        else:
            g = _as_float(tl.load(amax_ptr + n_blocks + blk * 0))
        s_enc = fdiv_rn(tl.full([LANES], 2688.0, tl.float32), g)
        s_enc = tl.where(g == 0, 1.0, s_enc)
        s_enc = tl.where((s_enc == float("inf")) | (s_enc == float("-inf")), 3.4028234663852886e38, s_enc)
        t = fdiv_rn(amax, tl.full([LANES], 6.0, tl.float32)) * s_enc
        t = tl.where(t < 0.015625, 0.015625, t)
        t = tl.where(t > 448.0, 448.0, t)
        code = round_to_code(t, tl.zeros([LANES], dtype=tl.uint32), False, 3, 7, 0x7E, 0x7E, 0x7F, 7)
        tl.store(scale_ptr + blk, code.to(tl.uint8), mask=mask)
        tl.store(factor_ptr + blk, decode_element(code, 4, 3, 7), mask=mask)
        tl.store(gs_ptr + blk * 0, s_enc, mask=blk == 0)


@triton.jit
def _encode_kernel(v_ptr, factor_ptr, gs_ptr, out_ptr, R, K, br, bk, nbk, inner, seed, KIND: tl.constexpr,
                   STOCHASTIC: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
                   INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr,
                   PACKED: tl.constexpr, BF16: tl.constexpr, TR: tl.constexpr, TK: tl.constexpr):
    n_cols = tl.cdiv(K, TK)  # flat grid: axes 1 and 2 stop at 65535 programs
    pj = (tl.program_id(0) % n_cols).to(tl.int64)
    rows = (tl.program_id(0) // n_cols).to(tl.int64) * TR + tl.arange(0, TR)
    cols = pj * TK + tl.arange(0, TK)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    v = load_fp32(v_ptr, rows[:, None] * K + cols[None, :], mask, BF16)
    blk = (rows // br)[:, None] * nbk + (cols // bk)[None, :]
    f = tl.load(factor_ptr + blk, mask=mask, other=1.0)
    if KIND == 0:
        scaled = fdiv_rn(v, f)
    elif KIND == 1:
        scaled = v * f
    else:
        scaled = fdiv_rn(v * tl.load(gs_ptr), f)
    rbits = tl.zeros([TR, TK], dtype=tl.uint32)
    if STOCHASTIC:
        index = (rows // inner)[:, None] * K * inner + cols[None, :] * inner + (rows % inner)[:, None]
        rbits = random_bits(seed, index)
    code = round_to_code(scaled, rbits, STOCHASTIC, MBITS, BIAS, MAX_CODE, INF_CODE, NAN_CODE, SIGN_SHIFT)
    if PACKED:
        lo, hi = tl.split(tl.reshape(code, (TR, TK // 2, 2)))
        pcols = pj * (TK // 2) + tl.arange(0, TK // 2)
        pmask = (rows < R)[:, None] & (pcols < K // 2)[None, :]
        tl.store(out_ptr + rows[:, None] * (K // 2) + pcols[None, :], (lo | (hi << 4)).to(tl.uint8), mask=pmask)
    else:
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], code.to(tl.uint8), mask=mask)


def scale_grid(n_blocks: int) -> tuple[int]:
    return (triton.cdiv(n_blocks, SCALE_LANES),)


def encode_plan(R: int, K: int) -> tuple[tuple[int], int, int]:
    """(grid, TR, TK) of `_encode_kernel` for an [R, K] input: TILE elements per program, one flat axis."""
    tk = min(MAX_TK, max(2, triton.next_power_of_2(K)))
    tr = min(TILE // tk, triton.next_power_of_2(R))
    return (triton.cdiv(R, tr) * triton.cdiv(K, tk),), tr, tk


def smem_bytes() -> int:
    """Upper bound of the kernels' shared memory: one fp32 TILE through a layout change (FP4 pairing)."""
    return TILE * 4


def quantize(x, fmt, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    R, K = x.shape
    br, bk = block
    dev = x.device
    v = x.contiguous()
    if hadamard_block:
        v = hadamard(v, hadamard_block, seed, False)
    kind = KIND[fmt.kind]
    nbr, nbk = (R // br if br else 0), (K // bk if bk else 0)
    n_blocks = nbr * nbk
    has_global = fmt.kind == "nvfp4" and global_amax is not None
    amax = block_amax_bits(v, br, bk, total=fmt.kind == "nvfp4" and not has_global)
    gamax = global_amax.to(device=dev, dtype=torch.float32).reshape(1) if has_global else amax
    scale = torch.empty((nbr, nbk), dtype=torch.float32 if kind == 0 else torch.uint8, device=dev)
    factor = torch.empty(n_blocks, dtype=torch.float32, device=dev)
    gs = torch.ones((), dtype=torch.float32, device=dev)
    if n_blocks:
        _scale_kernel[scale_grid(n_blocks)](
            amax, gamax, scale, factor, gs, n_blocks, kind, SCALE_MODE[scale_mode], fmt.elem.max, fmt.elem.emax,
            has_global, SCALE_LANES, enable_fp_fusion=False)
    data = torch.empty((R, K // 2 if fmt.packed else K), dtype=torch.uint8, device=dev)
    if R and K:
        vk, bf16 = as_kernel_input(v)
        grid, tr, tk = encode_plan(R, K)
        _encode_kernel[grid](
            vk, factor, gs, data, R, K, br, bk, nbk, inner, seed, kind, rounding == "stochastic",
            *ELEMENT_CODES[fmt.elem.name], fmt.packed, bf16, tr, tk, enable_fp_fusion=False)
    if not fmt.packed:
        data = data.view(fmt.elem.torch_dtype)
    if kind == 2:
        scale = scale.view(torch.float8_e4m3fn)
    return data, scale, gs
