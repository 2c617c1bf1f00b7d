"""Independent helpers for the tests: written from the format definitions, not from lowbit's code."""
from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on Python ints: counter 4 words, key 2 words."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c


def rounding_word(seed: int, i: int) -> int:
    """r(seed, i): word i mod 4 of Philox with counter (i div 4, 0, 0, 0), key (seed lo, seed hi)."""
    q = i // 4
    return philox4x32_10((q & M32, q >> 32, 0, 0), (seed & M32, seed >> 32))[i % 4]


def decode_minifloat(code: int, ebits: int, mbits: int, bias: int, ieee_specials: bool, nan_all_ones: bool) -> float:
    """Value of a sign/exponent/mantissa code, from the textbook definition.

    ieee_specials: an all-ones exponent means Inf (mantissa 0) or NaN (E5M2, fp16).
    nan_all_ones: only exponent and mantissa all ones is NaN (E4M3 "fn").
    """
    sign = -1.0 if code >> (ebits + mbits) & 1 else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    if ieee_specials and e == (1 << ebits) - 1:
        return sign * math.inf if m == 0 else math.nan
    if nan_all_ones and e == (1 << ebits) - 1 and m == (1 << mbits) - 1:
        return math.nan
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - mbits)
    return sign * (1 + m / 2**mbits) * 2.0 ** (e - bias)


# E2M1 magnitudes by code 0..7 (OCP MX v1.0, table 5): written out, not derived.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round-to-nearest-even onto E2M1 by magnitude: (upper bound, is the bound itself included, result).
# Ties go to the code with an even last mantissa bit: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
E2M1_RNE_TABLE = (
    (0.25, True, 0.0), (0.75, False, 0.5), (1.25, True, 1.0), (1.75, False, 1.5),
    (2.5, True, 2.0), (3.5, False, 3.0), (5.0, True, 4.0), (math.inf, True, 6.0),
)


def e2m1_rne(v: float) -> float:
    """Nearest-even E2M1 value of v (saturating at 6; NaN stays NaN)."""
    if math.isnan(v):
        return math.nan
    a = abs(v)
    for bound, inclusive, out in E2M1_RNE_TABLE:
        if a < bound or (inclusive and a == bound):
            return math.copysign(out, v)
    raise AssertionError


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double()
    y = y.double()
    return float(10 * torch.log10((x * x).sum() / ((x - y) ** 2).sum()))


def bf16_all() -> torch.Tensor:
    """All 65,536 bf16 bit patterns, in code order."""
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
