"""Shared @triton.jit helpers: Philox bits, grid rounding to element codes, exponent rules.

Every rounding decision is made with integer operations on the fp32 bit pattern, so the result
does not depend on how a device (or the interpreter) rounds float conversions, and every
division is an integer long division (`fdiv_rn`), so none depends on a flush-to-zero setting.
The rules are those of the `lowbit.backends.ref` package.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Element descriptors for the kernels: (mbits, bias, max code, Inf code, NaN code, sign shift).
# An element without Inf maps Inf to its largest finite code (as ref.round_to_element does).
ELEMENT_CODES = {
    "e4m3": (3, 7, 0x7E, 0x7E, 0x7F, 7),
    "e5m2": (2, 15, 0x7B, 0x7C, 0x7F, 7),
    "e2m1": (1, 1, 0x7, 0x7, 0x0, 3),
    "bf16": (7, 127, 0x7F7F, 0x7F80, 0x7FC0, 15),
    "fp16": (10, 15, 0x7BFF, 0x7C00, 0x7E00, 15),
}

# Storage decoding for the scaled formats' elements: (ebits, mbits, bias).
ELEMENT_LAYOUT = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15), "e2m1": (2, 1, 1)}


@triton.jit
def load_fp32(ptr, offs, mask, BF16: tl.constexpr):
    """Load an input as fp32; bf16 arrives as its int16 bits and widens by a shift (exact everywhere)."""
    if BF16:
        return (tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


def as_kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor to pass, BF16 flag) for `load_fp32`; fp64 is first rounded to fp32 as ref does."""
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    x = x.contiguous()
    return (x.view(torch.int16), True) if x.dtype == torch.bfloat16 else (x, False)


@triton.jit
def random_bits(seed, index):
    """r(seed, i): word i % 4 of Philox4x32-10, counter (lo32(i // 4), hi32(i // 4), 0, 0)."""
    index = index.to(tl.int64)
    q = index >> 2
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((q >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
    lane = index & 3
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def hadamard_negative(seed, index):
    """True where the Hadamard sign s_j is -1: top bit of word j % 4, counter (j // 4, 0, 1, 0)."""
    index = index.to(tl.int64)
    c0 = ((index >> 2) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, zero, zero + 1, zero)
    lane = index & 3
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return (w >> 31) != 0


@triton.jit
def _significand(a):
    """(m, e) with m in [2^23, 2^24) and |f| = m * 2^(e - 23), from the bits `a` of a finite non-zero fp32."""
    ef = a >> 23
    man = a & 0x7FFFFF
    shift = 23 - msb(tl.maximum(man, 1))
    m = tl.where(ef > 0, man | 0x800000, man << shift)
    e = tl.where(ef > 0, ef - 127, -126 - shift)
    return m, e


@triton.jit
def fdiv_rn(x, y):
    """x / y in fp32, correctly rounded to nearest-even, subnormals included, by integer long division.

    Same result as IEEE division on any device whatever its flush-to-zero setting; NaN results are
    the canonical 0x7FC00000.
    """
    xb = x.to(tl.int32, bitcast=True)
    yb = y.to(tl.int32, bitcast=True)
    sign = (xb ^ yb) & -2147483648
    xa = xb & 0x7FFFFFFF
    ya = yb & 0x7FFFFFFF
    nan = (xa > 0x7F800000) | (ya > 0x7F800000) | ((xa == 0) & (ya == 0)) | \
        ((xa == 0x7F800000) & (ya == 0x7F800000))
    inf = (xa == 0x7F800000) | (ya == 0)
    zero = (xa == 0) | (ya == 0x7F800000)
    mx, ex = _significand(tl.where(nan | inf | zero, 0x3F800000, xa))
    my, ey = _significand(tl.where(nan | inf | zero, 0x3F800000, ya))
    num = mx.to(tl.int64) << 39
    q = num // my.to(tl.int64)  # in (2^38, 2^40): the quotient mx / my with 39 fraction bits
    sticky = (num - q * my.to(tl.int64)) != 0
    lead = tl.where(q >= (1 << 39), 39, 38)
    e = ex - ey + lead - 39  # exponent of the result
    drop = tl.where(e >= -126, lead - 23, ey - ex - 110)  # bits below the result's last place
    drop = tl.minimum(drop, 45)  # from 41 on the result is 0 (q < 2^40 < half)
    kept = q >> drop
    rem = q & ((tl.full(q.shape, 1, tl.int64) << drop) - 1)
    half = tl.full(q.shape, 1, tl.int64) << (drop - 1)
    up = (rem > half) | ((rem == half) & (sticky | ((kept & 1) == 1)))
    kept = kept + up.to(tl.int64)
    mag = tl.where(e >= -126, ((e + 127).to(tl.int64) << 23) + kept - (1 << 23), kept)
    mag = tl.minimum(mag, 0x7F800000).to(tl.int32)
    mag = tl.where(zero, 0, tl.where(inf, 0x7F800000, mag))
    bits = tl.where(nan, 0x7FC00000, mag | sign)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_code(v, rbits, STOCHASTIC: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                  MAX_CODE: tl.constexpr, INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
                  SIGN_SHIFT: tl.constexpr):
    """fp32 values -> element codes (int32), satfinite, nearest-even or stochastic with `rbits`."""
    b = v.to(tl.int32, bitcast=True)
    sign = (b >> 31) & 1
    a = b & 0x7FFFFFFF
    ef = a >> 23
    normal = ef > 0
    m = tl.where(normal, (a & 0x7FFFFF) | 0x800000, a & 0x7FFFFF)
    eeff = tl.where(normal, ef - 127, -126)
    # exponent of the element binade holding |v| (never below the element's normal range)
    exp = tl.where(normal, tl.maximum(ef - 127, 1 - BIAS), 1 - BIAS)
    # |v| / ulp = m * 2^-s with ulp = 2^(exp - MBITS); s >= 23 - MBITS > 0
    s = exp - MBITS - eeff + 23
    sc = tl.minimum(s, 30)  # from 24 on, n = 0 and rem = m
    n = m >> sc
    rem = m & ((1 << sc) - 1)
    if STOCHASTIC:
        # frac > u  <=>  rem * 2^24 > (r >> 8) * 2^s, with rem < 2^min(s, 24) and r >> 8 < 2^24;
        # from s = 48 on only u == 0 rounds up
        u = (rbits >> 8).to(tl.int64)
        r64 = rem.to(tl.int64)
        up = tl.where(s < 24, (r64 << tl.maximum(24 - s, 0)) > u, r64 > (u << tl.minimum(tl.maximum(s - 24, 0), 24)))
    else:
        half = 1 << (sc - 1)
        up = (rem > half) | ((rem == half) & ((n & 1) == 1))
    mag = ((exp + (BIAS - 1)) << MBITS) + n + up.to(tl.int32)
    mag = tl.minimum(mag, MAX_CODE)
    mag = tl.where(a == 0x7F800000, INF_CODE, mag)
    code = (sign << SIGN_SHIFT) | mag
    return tl.where(a > 0x7F800000, NAN_CODE, code)


@triton.jit
def msb(x):
    """floor(log2(x)) for int32 x >= 1."""
    r = x * 0
    t = x >= (1 << 16)
    r += tl.where(t, 16, 0)
    x = tl.where(t, x >> 16, x)
    t = x >= (1 << 8)
    r += tl.where(t, 8, 0)
    x = tl.where(t, x >> 8, x)
    t = x >= (1 << 4)
    r += tl.where(t, 4, 0)
    x = tl.where(t, x >> 4, x)
    t = x >= (1 << 2)
    r += tl.where(t, 2, 0)
    x = tl.where(t, x >> 2, x)
    t = x >= 2
    r += tl.where(t, 1, 0)
    return r


@triton.jit
def floor_log2(a):
    """floor(log2(|f|)) from the bits `a` of a positive finite non-zero fp32 f (subnormals too)."""
    ef = a >> 23
    man = a & 0x7FFFFF
    return tl.where(ef > 0, ef - 127, msb(tl.maximum(man, 1)) - 149)


@triton.jit
def is_pow2(a):
    """Whether the positive finite non-zero fp32 with bits `a` is a power of two."""
    ef = a >> 23
    man = a & 0x7FFFFF
    return tl.where(ef > 0, man == 0, (man & (man - 1)) == 0)


@triton.jit
def exp2_int(e):
    """2^e as fp32 for int32 e in [-149, 127] (exact, subnormals included)."""
    bits = tl.where(e >= -126, (e + 127) << 23, 1 << tl.maximum(e + 149, 0))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def decode_element(code, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """Element codes (int32, sign at bit EBITS + MBITS) -> fp32 (E4M3: 0x7F/0xFF NaN; E5M2: Inf, NaN)."""
    SIGN: tl.constexpr = EBITS + MBITS
    e = (code >> MBITS) & ((1 << EBITS) - 1)
    mant = code & ((1 << MBITS) - 1)
    normal = ((e - BIAS + 127) << 23) | (mant << (23 - MBITS))
    sub = mant.to(tl.float32) * exp2_int(mant * 0 + (1 - BIAS - MBITS))
    bits = tl.where(e == 0, sub.to(tl.int32, bitcast=True), normal)
    if EBITS == 4:
        bits = tl.where((code & 0x7F) == 0x7F, 0x7FC00000, bits)
    if EBITS == 5:
        bits = tl.where(e == 31, tl.where(mant == 0, 0x7F800000, 0x7FC00000), bits)
    bits = bits | (((code >> SIGN) & 1) << 31)
    return bits.to(tl.float32, bitcast=True)
