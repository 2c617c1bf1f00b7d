"""Quantize, dequantize and cast: the spec of the rounding and scaling rules (see the package docstring)."""
from __future__ import annotations

import math

import torch

from ...bits import element_index, pack_fp4, random_bits, uniform_from_bits, unpack_fp4
from ...formats import E2M1, E4M3, ELEMENT_OF_DTYPE, Element, Format
from .hadamard import hadamard
from .int4 import dequantize_int4, quantize_int4

NVFP4_ENC = 448.0 * 6.0
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NAN_CODE = {"e4m3": 0x7F, "e5m2": 0x7F, "bf16": 0x7FC0, "fp16": 0x7E00}


# ----------------------------------------------------------------------------- element rounding
def round_to_element(v: torch.Tensor, elem: Element, rounding: str, bits: torch.Tensor | None = None) -> torch.Tensor:
    """Round fp32 values onto `elem`'s grid (satfinite); returns float64 grid values.

    NaN stays NaN; Inf stays Inf if `elem` has Inf, else saturates.
    """
    v64 = v.to(torch.float64)
    a = v64.abs()
    finite = torch.isfinite(a)
    a_f = torch.where(finite, a, torch.zeros_like(a))
    _, e = torch.frexp(a_f)  # a = m * 2^e, m in [0.5, 1)
    exp = torch.clamp(e.to(torch.int64) - 1, min=elem.emin)
    ulp = torch.pow(2.0, (exp - elem.mbits).to(torch.float64))
    scaled = a_f / ulp
    n = torch.floor(scaled)
    frac = scaled - n
    if rounding == "nearest":
        odd = torch.remainder(n, 2) == 1
        up = (frac > 0.5) | ((frac == 0.5) & odd)
    elif rounding == "stochastic":
        up = frac > uniform_from_bits(bits)
    else:
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    q = torch.clamp((n + up.to(torch.float64)) * ulp, max=elem.max)
    inf_value = math.inf if elem.has_inf else elem.max
    q = torch.where(finite, q, torch.full_like(q, inf_value))
    q = torch.copysign(q, v64)
    return torch.where(torch.isnan(v64), torch.full_like(q, math.nan), q)


def encode_fp4(q: torch.Tensor) -> torch.Tensor:
    """E2M1 grid values (float64) -> 4-bit codes as uint8 (NaN -> 0)."""
    grid = torch.tensor(FP4_GRID, dtype=torch.float64, device=q.device)
    mag = (q.abs().unsqueeze(-1) == grid).to(torch.uint8).argmax(-1).to(torch.uint8)
    sign = torch.signbit(q).to(torch.uint8) << 3
    return torch.where(torch.isnan(q), torch.zeros_like(mag), sign | mag)


def decode_fp4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, low nibble) -> fp32 values."""
    grid = torch.tensor(FP4_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def encode_elements(q: torch.Tensor, elem: Element) -> torch.Tensor:
    """Grid values (float64) -> storage: float8 tensor, or unpacked FP4 codes (uint8)."""
    if elem is E2M1:
        return encode_fp4(q)
    out = q.to(elem.torch_dtype)
    return _canonical_nan(out, q, elem)


def _canonical_nan(out: torch.Tensor, q: torch.Tensor, elem: Element) -> torch.Tensor:
    int_dtype = torch.uint8 if out.element_size() == 1 else torch.int16
    code = out.view(int_dtype)
    nan = torch.full_like(code, NAN_CODE[elem.name])
    return torch.where(torch.isnan(q), nan, code).view(out.dtype)


# ----------------------------------------------------------------------------- cast
def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    """Round x (any float dtype, first made fp32) to `dtype` (bf16, fp16, fp8)."""
    elem = ELEMENT_OF_DTYPE[dtype]
    v = x.to(torch.float32)
    bits = None
    if rounding == "stochastic":
        bits = random_bits(seed, torch.arange(v.numel(), dtype=torch.int64, device=v.device).view(v.shape))
    q = round_to_element(v, elem, rounding, bits)
    return _canonical_nan(q.to(dtype), q, elem)


# ----------------------------------------------------------------------------- blocks
def _blocks(x: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    """[R, K] -> [R/br, K/bk, br*bk] view of the tiles."""
    R, K = x.shape
    return x.reshape(R // br, br, K // bk, bk).permute(0, 2, 1, 3).reshape(R // br, K // bk, br * bk)


def block_amax(x: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    """amax per tile, NaN if the tile holds NaN or Inf."""
    t = _blocks(x, br, bk)
    bad = ~torch.isfinite(t).all(-1)
    amax = t.abs().amax(-1) if t.shape[-1] else torch.zeros(t.shape[:2], dtype=t.dtype, device=t.device)
    return torch.where(bad, torch.full_like(amax, math.nan), amax)


def _expand(s: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    return s.repeat_interleave(br, 0).repeat_interleave(bk, 1)


def _pow2_floor_exp(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for positive finite fp32 a, exact (frexp)."""
    _, e = torch.frexp(a.to(torch.float64))
    return e.to(torch.int64) - 1


def _pow2_ceil_exp(a: torch.Tensor) -> torch.Tensor:
    m, e = torch.frexp(a.to(torch.float64))
    return e.to(torch.int64) - (m == 0.5).to(torch.int64)


def fp8_scale(amax: torch.Tensor, elem: Element, scale_mode: str) -> torch.Tensor:
    d = amax / torch.tensor(elem.max, dtype=torch.float32)
    d = torch.where(amax == 0, torch.ones_like(d), d)
    d = torch.where(d < 2.0**-126, torch.full_like(d, 2.0**-126), d)  # NaN passes
    if scale_mode in ("rceil", "floor"):
        e = _pow2_ceil_exp(d) if scale_mode == "rceil" else _pow2_floor_exp(d)
        p2 = torch.pow(2.0, e.to(torch.float64)).to(torch.float32)
        d = torch.where(torch.isnan(d), d, p2)
    return d


def mx_scale_exponent(amax: torch.Tensor, elem: Element, scale_mode: str) -> torch.Tensor:
    """Unbiased E8M0 exponent per block (int64); NaN blocks get 128 (byte 0xFF)."""
    safe = torch.where(torch.isnan(amax) | (amax == 0), torch.ones_like(amax), amax)
    if scale_mode == "rceil":
        ratio = safe / torch.tensor(elem.max, dtype=torch.float32)
        e = torch.where(ratio == 0, torch.full_like(amax, -127, dtype=torch.int64), _pow2_ceil_exp(ratio))
    else:
        e = _pow2_floor_exp(safe) - elem.emax
    e = torch.clamp(e, -127, 127)
    e = torch.where(amax == 0, torch.full_like(e, -127), e)
    return torch.where(torch.isnan(amax), torch.full_like(e, 128), e)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.to(torch.float32)
    s = torch.tensor(NVFP4_ENC, dtype=torch.float32) / amax
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isinf(s), torch.full_like(s, torch.finfo(torch.float32).max), s)


def nvfp4_block_scale(amax_blk: torch.Tensor, s_enc: torch.Tensor) -> torch.Tensor:
    """E4M3 block scale (as float8_e4m3fn), always round-to-nearest-even."""
    t = amax_blk / torch.tensor(6.0, dtype=torch.float32) * s_enc
    t = torch.clamp(t, 2.0**-6, 448.0)
    q = round_to_element(t, E4M3, "nearest")
    return _canonical_nan(q.to(torch.float8_e4m3fn), q, E4M3)


# ----------------------------------------------------------------------------- quantize
def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    """[R, K] float -> (data, scale, global_scale) per the module docstring."""
    if fmt.kind == "int4":  # its own rules (no Hadamard transform, no scale modes)
        return quantize_int4(x, fmt, block, rounding, seed, inner)
    R, K = x.shape
    br, bk = block
    v = x.to(torch.float32)
    if hadamard_block:
        v = hadamard(v, hadamard_block, seed, inverse=False)
    bits = random_bits(seed, element_index(R, K, inner, x.device)) if rounding == "stochastic" else None
    amax = block_amax(v, br, bk)
    global_scale = torch.ones((), dtype=torch.float32, device=x.device)
    if fmt.kind == "fp8":
        scale = fp8_scale(amax, fmt.elem, scale_mode)
        scaled = v / _expand(scale, br, bk)
    elif fmt.kind == "mx":
        e = mx_scale_exponent(amax, fmt.elem, scale_mode)
        inv = torch.pow(2.0, (-e).to(torch.float64)).to(torch.float32)
        inv = torch.where(e == 128, torch.full_like(inv, math.nan), inv)
        scaled = v * _expand(inv, br, bk)
        scale = (e + 127).to(torch.uint8)
    elif fmt.kind == "nvfp4":
        tensor_amax = global_amax if global_amax is not None else block_amax(v, R, K).reshape(())
        if global_amax is None and v.numel() == 0:
            tensor_amax = torch.zeros((), dtype=torch.float32, device=x.device)
        global_scale = nvfp4_global_scale(tensor_amax.reshape(()))
        scale = nvfp4_block_scale(amax, global_scale)
        scaled = v * global_scale / _expand(scale.to(torch.float32), br, bk)
    else:
        raise ValueError(f"fmt: unsupported kind {fmt.kind!r}")
    q = round_to_element(scaled, fmt.elem, rounding, bits)
    data = encode_elements(q, fmt.elem)
    if fmt.packed:
        data = pack_fp4(data)
    return data, scale, global_scale


def dequantize(data, scale, global_scale, fmt: Format, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    if fmt.kind == "int4":
        return dequantize_int4(data, scale, fmt, block, K, dtype)
    br, bk = block
    if fmt.packed:
        q = decode_fp4(unpack_fp4(data))
    else:
        q = data.to(torch.float32)
    R = q.shape[0]
    if fmt.kind == "fp8":
        out = q * _expand(scale, br, bk)
    elif fmt.kind == "mx":
        e = scale.to(torch.int64) - 127
        s = torch.pow(2.0, e.to(torch.float64)).to(torch.float32)
        s = torch.where(e == 128, torch.full_like(s, math.nan), s)
        out = q * _expand(s, br, bk)
    else:
        out = q * _expand(scale.to(torch.float32), br, bk) / global_scale
    return out.reshape(R, K).to(dtype)
