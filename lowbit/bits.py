"""Bit-level helpers that several layers share: Philox4x32-10 words and E2M1 (FP4) code packing.

These are part of the numerics spec (see `lowbit.backends.ref`): every backend draws the same
random words and packs FP4 codes the same way, and `QTensor.t()` repacks codes without a backend.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
ROUNDING_STREAM, HADAMARD_STREAM = 0, 1


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and int64 tensor b < 2^32."""
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    lo_full = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (lo_full >> 32), lo_full & MASK32


def philox4x32(c0, c1, c2, c3, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values; key = (seed lo32, seed hi32)."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return [c0, c1, c2, c3]


def philox_word(index: torch.Tensor, stream: int, seed: int) -> torch.Tensor:
    """Word `index mod 4` of the Philox block of `index div 4` in `stream` (int64 holding uint32)."""
    q = index >> 2
    zero = torch.zeros_like(q)
    if stream == ROUNDING_STREAM:  # counter (lo32(i/4), hi32(i/4), 0, 0)
        words = philox4x32(q & MASK32, q >> 32, zero, zero, seed)
    else:  # Hadamard signs: counter (j/4, 0, 1, 0)
        words = philox4x32(q, zero, zero + 1, zero, seed)
    lane = index & 3
    out = words[0]
    for w in range(1, 4):
        out = torch.where(lane == w, words[w], out)
    return out


def random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """r(seed, i), the stochastic-rounding word of element i, as an int64 tensor of uint32 values."""
    return philox_word(index.to(torch.int64), ROUNDING_STREAM, seed)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """u = (r >> 8) * 2^-24, as float64 (exact)."""
    return (bits >> 8).to(torch.float64) * 2.0**-24


def element_index(R: int, K: int, inner: int, device=None) -> torch.Tensor:
    """Flat index in the caller's tensor of each element of the [R, K] working view."""
    r = torch.arange(R, dtype=torch.int64, device=device).unsqueeze(1)
    k = torch.arange(K, dtype=torch.int64, device=device).unsqueeze(0)
    return (r // inner) * (K * inner) + k * inner + (r % inner)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, one per byte) -> two per byte: element 2i low nibble, 2i+1 high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
