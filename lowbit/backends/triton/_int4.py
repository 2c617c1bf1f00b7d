"""INT4 (Stable-SPAM's formats) quantize / dequantize kernels, bit for bit `lowbit.backends.ref.int4`.

A program holds GR whole groups as a [GR, GP] tile (GP: g rounded up to a power of two, the extra
lanes masked), so a group's min / max / top-2 are row reductions in registers. Divisions go
through `fdiv_rn` (correctly rounded whatever the device's flush-to-zero setting), and the kept
values are re-loaded from x rather than summed out of the tile, which would turn -0 into +0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import as_kernel_input, fdiv_rn, load_fp32, random_bits

TILE = 2048  # elements per program
W_EPS_BITS, A_EPS_BITS, NAN_BITS = 0x3727C5AC, 0x358637BD, 0x7FC00000  # fp32 1e-5, 1e-6, the canonical NaN


@triton.jit
def _f32(bits, like):
    return (tl.zeros(like.shape, tl.int32) + bits).to(tl.float32, bitcast=True)


@triton.jit
def _round_int(v, rbits, STOCHASTIC: tl.constexpr):
    """round(v) of the spec: |v| onto the integers (ties to even, or up iff frac > u), then v's sign."""
    a = tl.abs(v)
    n = tl.floor(a)
    frac = a - n
    if STOCHASTIC:
        up = frac > (rbits >> 8).to(tl.float32) * 5.9604644775390625e-08  # u = (r >> 8) * 2^-24, exact
    else:
        odd = (n - 2.0 * tl.floor(n * 0.5)) == 1.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
    m = n + up.to(tl.float32)
    return tl.where(v < 0, -m, m)


@triton.jit
def _group_tile(n_groups, G, g, GR: tl.constexpr, GP: tl.constexpr):
    """This program's GR groups of g (padded to GP): group ids, positions in a group, masks, row, group
    in the row and column of every element."""
    grp = tl.program_id(0).to(tl.int64) * GR + tl.arange(0, GR)
    j = tl.arange(0, GP)
    gmask = grp < n_groups
    mask = gmask[:, None] & (j < g)[None, :]
    r, c = grp // G, grp % G
    return grp, j, gmask, mask, r, c, c[:, None] * g + j[None, :]


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, rec_ptr, n_groups, G, K, g, seed, inner, WEIGHT: tl.constexpr,
                     STOCHASTIC: tl.constexpr, BF16: tl.constexpr, PACK: tl.constexpr, GR: tl.constexpr,
                     GP: tl.constexpr):
    grp, j, gmask, mask, r, c, col = _group_tile(n_groups, G, g, GR, GP)
    v = load_fp32(x_ptr, r[:, None] * K + col, mask, BF16)
    bits = v.to(tl.int32, bitcast=True)
    nonfinite = mask & ((bits & 0x7F800000) == 0x7F800000)
    bad = tl.max(nonfinite.to(tl.int32), axis=1) > 0
    v = tl.where(bad[:, None] | ~mask, 0.0, v)  # any finite stand-in: bad groups are overwritten below
    rbits = tl.zeros([GR, GP], dtype=tl.uint32)
    if STOCHASTIC:
        rbits = random_bits(seed, (r // inner)[:, None] * K * inner + col * inner + (r % inner)[:, None])
    nan = _f32(NAN_BITS, grp.to(tl.float32))
    if WEIGHT:
        mx = tl.max(tl.where(mask, v, float("-inf")), axis=1)
        mn = tl.min(tl.where(mask, v, float("inf")), axis=1)
        mx, mn = tl.where(gmask, mx, 0.0), tl.where(gmask, mn, 0.0)  # groups past the end: no Inf arithmetic
        d = mx - mn
        eps = _f32(W_EPS_BITS, d)
        d = tl.where(d < eps, eps, d)
        s = fdiv_rn(d, tl.full(d.shape, 15.0, tl.float32))  # d may be Inf (a range beyond FLT_MAX)
        z = tl.minimum(tl.maximum(-_round_int(fdiv_rn(mn, s), rbits, False), 0.0), 15.0)
        z = tl.where(bad | (z == 0), 0.0, z)  # +0, never -0
        vs = fdiv_rn(v, s[:, None] + tl.zeros(v.shape, tl.float32))
        q = tl.minimum(tl.maximum(_round_int(vs, rbits, STOCHASTIC) + z[:, None], 0.0), 15.0).to(tl.int32)
        tl.store(rec_ptr + grp * 2, tl.where(bad, nan, s), mask=gmask)
        tl.store(rec_ptr + grp * 2 + 1, z, mask=gmask)
    else:
        a = tl.where(mask, tl.abs(v), -1.0)
        i0 = tl.min(tl.where(a == tl.max(a, axis=1)[:, None], j[None, :], GP), axis=1)  # lowest position of the max
        a = tl.where(j[None, :] == i0[:, None], -1.0, a)
        i1 = tl.min(tl.where(a == tl.max(a, axis=1)[:, None], j[None, :], GP), axis=1)
        kept = (j[None, :] == i0[:, None]) | (j[None, :] == i1[:, None])
        y = tl.where(kept, 0.0, v)
        s = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
        eps = _f32(A_EPS_BITS, s)
        s = tl.where(s < eps, eps, s)
        t = fdiv_rn(tl.full(s.shape, 1.0, tl.float32), s) * 7.0
        q = tl.minimum(tl.maximum(_round_int(y * t[:, None], rbits, STOCHASTIC), -8.0), 7.0).to(tl.int32) & 0xF
        base = r * K + c * g
        lmask = gmask & ~bad
        v0 = load_fp32(x_ptr, base + i0, lmask, BF16)
        v1 = load_fp32(x_ptr, base + i1, lmask, BF16)
        tl.store(rec_ptr + grp * 5, tl.where(bad, nan, s), mask=gmask)
        tl.store(rec_ptr + grp * 5 + 1, tl.where(bad, nan, v0), mask=gmask)
        tl.store(rec_ptr + grp * 5 + 2, tl.where(bad, nan, v1), mask=gmask)
        tl.store(rec_ptr + grp * 5 + 3, tl.where(bad, 0, i0).to(tl.float32), mask=gmask)
        tl.store(rec_ptr + grp * 5 + 4, tl.where(bad, 1, i1).to(tl.float32), mask=gmask)
    q = tl.where(bad[:, None], 0, q)
    if PACK:  # g even: byte pairs never straddle a group
        lo, hi = tl.split(tl.reshape(q, (GR, GP // 2, 2)))
        jj = tl.arange(0, GP // 2)
        pmask = gmask[:, None] & (jj < g // 2)[None, :]
        tl.store(codes_ptr + r[:, None] * (K // 2) + c[:, None] * (g // 2) + jj[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=pmask)
    else:
        tl.store(codes_ptr + r[:, None] * K + col, q.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(data_ptr, rec_ptr, out_ptr, n_groups, G, K, g, WEIGHT: tl.constexpr, GR: tl.constexpr,
                       GP: tl.constexpr):
    grp, j, gmask, mask, r, c, col = _group_tile(n_groups, G, g, GR, GP)
    byte = tl.load(data_ptr + r[:, None] * (K // 2) + col // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((col & 1) * 4).to(tl.int32)) & 0xF
    if WEIGHT:
        s = tl.load(rec_ptr + grp * 2, mask=gmask, other=1.0)
        z = tl.load(rec_ptr + grp * 2 + 1, mask=gmask, other=0.0)
        out = (code.to(tl.float32) - z[:, None]) * s[:, None]
    else:
        s = tl.load(rec_ptr + grp * 5, mask=gmask, other=1.0)
        q = tl.where(code >= 8, code - 16, code).to(tl.float32)
        qs = q * s[:, None]
        out = fdiv_rn(qs, tl.full(qs.shape, 7.0, tl.float32))
        for k in tl.static_range(2):  # the second kept value last, as ref writes them
            val = tl.load(rec_ptr + grp * 5 + 1 + k, mask=gmask, other=0.0)
            pos = tl.load(rec_ptr + grp * 5 + 3 + k, mask=gmask, other=-1.0)
            hit = ((pos >= 0) & (pos < g))[:, None] & (j[None, :] == pos.to(tl.int32)[:, None])
            out = tl.where(hit, val[:, None], out)
    tl.store(out_ptr + r[:, None] * K + col, out, mask=mask)


def _plan(n_groups: int, g: int) -> tuple[tuple[int], int, int]:
    gp = max(2, triton.next_power_of_2(g))
    gr = max(1, min(TILE // gp, triton.next_power_of_2(n_groups)))
    return (triton.cdiv(n_groups, gr),), gr, gp


def quantize(x, fmt, block, rounding, seed, inner):
    R, K = x.shape
    g = block[1]
    G, weight = K // g, not fmt.elem.signed
    dev = x.device
    rec = torch.empty((R, G, fmt.scale_fields), dtype=torch.float32, device=dev)
    pack = g % 2 == 0
    codes = torch.empty((R, K // 2 if pack else K), dtype=torch.uint8, device=dev)
    if R and K:
        xk, bf16 = as_kernel_input(x)
        grid, gr, gp = _plan(R * G, g)
        _quantize_kernel[grid](xk, codes, rec, R * G, G, K, g, seed, inner, weight, rounding == "stochastic", bf16,
                               pack, gr, gp, enable_fp_fusion=False)
    if not pack:  # odd groups: bytes straddle them, so the codes were written one per byte
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, rec, torch.ones((), dtype=torch.float32, device=dev)


def dequantize(data, scale, fmt, block, K, dtype):
    R = data.shape[0]
    g = block[1]
    out = torch.empty((R, K), dtype=torch.float32, device=data.device)
    if R and K:
        grid, gr, gp = _plan(R * (K // g), g)
        _dequantize_kernel[grid](data.contiguous(), scale.to(torch.float32).contiguous(), out, R * (K // g), K // g,
                                 K, g, not fmt.elem.signed, gr, gp, enable_fp_fusion=False)
    return out if dtype == torch.float32 else out.to(dtype)
