"""INT4 (Stable-SPAM's integer formats): the spec of quantize and dequantize (package docstring, "INT4").

Works on the [R, K] view with 1 x g groups along K. `quantize_int4` returns (packed codes, the
fp32 record per group [R, K / g, F], a 0-d global scale of 1 that the format does not use).
"""
from __future__ import annotations

import torch

from ...bits import element_index, pack_fp4, random_bits, uniform_from_bits, unpack_fp4
from ...formats import INT4_TOPK, UINT4, Format

W_EPS = 1e-5  # lower bound of a weight group's range (max - min), as the fp32 nearest it
A_EPS = 1e-6  # lower bound of an activation group's scale, as the fp32 nearest it
W_LEVELS = 15.0  # uint4: 2^4 - 1 steps between min and max
A_MAX = 7.0  # int4: |x| = s maps to 7
NAN_BITS = 0x7FC00000


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _nan(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, NAN_BITS, dtype=torch.int32, device=like.device).view(torch.float32)


def round_int(v: torch.Tensor, rounding: str, bits: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 v -> the integer it rounds to (fp32): |v| rounds on the integer grid, then takes v's sign.

    nearest: up iff frac > 1/2, or frac == 1/2 and floor(|v|) is odd; stochastic: up iff frac > u.
    """
    a = v.abs()
    n = torch.floor(a)
    frac = a - n  # exact: a and n share a binade or n is 0
    if rounding == "nearest":
        up = (frac > 0.5) | ((frac == 0.5) & (torch.remainder(n, 2) == 1))
    elif rounding == "stochastic":
        up = frac.to(torch.float64) > uniform_from_bits(bits)
    else:
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    m = n + up.to(torch.float32)
    return torch.where(v < 0, -m, m) + 0.0  # + 0.0 turns -0 into +0


def topk_positions(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """In-group positions of the INT4_TOPK largest |x| (a = |x|, [..., g]), largest first, ties to the lowest index."""
    a = a.clone()
    out = []
    for _ in range(INT4_TOPK):
        i = torch.argmax(a, dim=-1, keepdim=True)  # argmax returns the first maximal index
        out.append(i)
        a.scatter_(-1, i, -1.0)  # below every |x|: never chosen again
    return tuple(out)


def _weight(grp: torch.Tensor, rounding: str, bits, bad: torch.Tensor):
    mx, mn = grp.amax(-1), grp.amin(-1)
    d = torch.maximum(mx - mn, _f32(W_EPS, grp))
    s = d / _f32(W_LEVELS, grp)
    z = torch.clamp(-round_int(mn / s, "nearest"), 0, 15) + 0.0
    q = torch.clamp(round_int(grp / s.unsqueeze(-1), rounding, bits) + z.unsqueeze(-1), 0, 15)
    s = torch.where(bad, _nan(s.shape, s), s)
    z = torch.where(bad, torch.zeros_like(z), z)
    return q, torch.stack([s, z], dim=-1)


def _act(grp: torch.Tensor, rounding: str, bits, bad: torch.Tensor):
    idx = topk_positions(grp.abs())
    kept = [torch.gather(grp, -1, i).squeeze(-1) for i in idx]
    y = grp.clone()
    for i in idx:
        y.scatter_(-1, i, 0.0)
    s = torch.maximum(y.abs().amax(-1), _f32(A_EPS, grp))
    t = (_f32(1.0, grp) / s) * _f32(A_MAX, grp)  # the official `7 / scale`, which PyTorch runs as reciprocal(scale) * 7
    q = torch.clamp(round_int(y * t.unsqueeze(-1), rounding, bits), -8, 7)
    nan = _nan(s.shape, s)
    fields = [torch.where(bad, nan, s)] + [torch.where(bad, nan, v) for v in kept]
    fields += [torch.where(bad, torch.full_like(s, float(j)), i.squeeze(-1).to(torch.float32)) for j, i in enumerate(idx)]
    return q, torch.stack(fields, dim=-1)


def quantize_int4(x: torch.Tensor, fmt: Format, block, rounding: str, seed: int, inner: int):
    R, K = x.shape
    g = block[1]
    grp = x.to(torch.float32).reshape(R, K // g, g)
    bad = ~torch.isfinite(grp).all(-1)
    safe = torch.where(bad.unsqueeze(-1), torch.zeros_like(grp), grp)  # any finite stand-in: overwritten below
    bits = None
    if rounding == "stochastic":
        bits = random_bits(seed, element_index(R, K, inner, x.device)).reshape(R, K // g, g)
    q, record = (_weight if fmt.elem is UINT4 else _act)(safe, rounding, bits, bad)
    q = torch.where(bad.unsqueeze(-1), torch.zeros_like(q), q)
    codes = q.to(torch.int32).reshape(R, K) & 0xF  # two's complement nibbles for int4
    gs = torch.ones((), dtype=torch.float32, device=x.device)
    return pack_fp4(codes.to(torch.uint8)), record, gs


def decode_int4_codes(data: torch.Tensor, signed: bool) -> torch.Tensor:
    """Packed nibbles [R, K / 2] -> fp32 integers [R, K] (signed: two's complement)."""
    c = unpack_fp4(data).to(torch.int32)
    if signed:
        c = torch.where(c >= 8, c - 16, c)
    return c.to(torch.float32)


def dequantize_int4(data: torch.Tensor, record: torch.Tensor, fmt: Format, block, K: int, dtype: torch.dtype):
    R = data.shape[0]
    g = block[1]
    q = decode_int4_codes(data, fmt.elem is not UINT4).reshape(R, K // g, g)
    s = record[..., 0].unsqueeze(-1)
    if fmt.elem is UINT4:
        out = (q - record[..., 1].unsqueeze(-1)) * s
    else:
        out = q * s / _f32(A_MAX, q)
        for j in range(INT4_TOPK):
            pos = record[..., 1 + INT4_TOPK + j].to(torch.int64).unsqueeze(-1)
            out = out.scatter(-1, pos, record[..., 1 + j].unsqueeze(-1))
    return out.reshape(R, K).to(dtype)
