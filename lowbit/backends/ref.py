"""Pure-PyTorch reference backend: the executable spec every other backend matches bit for bit.

Layout seen by backends
-----------------------
The public layer (`lowbit.ops`) moves the quantization axis last and flattens the rest, so
every backend op works on a 2-D `[R, K]` tensor with blocks `(br, bk)` that tile it exactly:
tensor-wise scaling is the block `(R, K)`, row-wise `(1, K)`, MX `(1, 32)`, NVFP4 `(1, 16)` or
`(16, 16)`, FP8 `(1, 128)` / `(128, 128)`. Scales have shape `[R // br, K // bk]`.

Random bits (stochastic rounding)
---------------------------------
`r(seed, i)` is word `i mod 4` of Philox4x32-10 with counter `(lo32(i div 4), hi32(i div 4), 0, 0)`
and key `(seed mod 2^32, seed div 2^32)`; for `i < 2^34` this is Triton's
`tl.randint4x(seed, i // 4)[i % 4]`. `i` is the flat row-major index of the element in the tensor
the caller passed, before the axis move or any Hadamard transform: for row `r`, column `k` of the
2-D view, `i = (r div inner) * K * inner + k * inner + (r mod inner)` where `inner` is the
product of the caller's dimensions after the quantization axis (1 when the axis is last).
`u = (r >> 8) * 2^-24`.

Rounding a value v onto an element grid
---------------------------------------
`lo` = grid point next to v toward zero, `hi` = next grid point away from zero,
`frac = (|v| - |lo|) / (|hi| - |lo|)` (exact: the spacing is a power of two).
nearest: `hi` iff `frac > 1/2`, or `frac == 1/2` and `lo` has an odd last mantissa bit (ties to even).
stochastic: `hi` iff `frac > u`.
Finite values beyond the largest finite value saturate to it (all formats: a "satfinite" cast).
Signed zeros keep their sign. NaN -> the canonical NaN (E4M3/E5M2 0x7F, bf16 0x7FC0, fp16 0x7E00).
Inf -> Inf where the element has one (E5M2, bf16, fp16), else the largest finite value (E4M3, as
torch's cast does). In scaled formats Inf and NaN make their block's scale NaN (below).

Scales (x is fp32; every operation below is one fp32 operation, evaluated left to right)
------------------------------------------------------------------------------------------
FP8 (fp32 scale `d`, x ~ q * d): `amax` over the block; `d = amax / max_elem`, `d = 1` when
  `amax == 0`, then `d = max(d, 2^-126)`. `scale_mode="rceil"` rounds `d` up to a power of two
  (nothing saturates), `"floor"` down to one (may saturate). Element `v = x / d`.
MX (OCP MX v1.0, E8M0 byte `e + 127`): `e = floor(log2(amax)) - emax_elem` (`"floor"`, exact
  from the exponent bits), or `e = ceil(log2(amax / max_elem))` (`"rceil"`), clamped to
  [-127, 127]; an all-zero block gets `e = -127`. Element `v = x * 2^-e`.
NVFP4: `s_enc = 2688 / amax(tensor)` (2688 = 448 * 6; `global_amax` replaces the tensor amax;
  `s_enc = 1` when that amax is 0; at most FLT_MAX). Per block
  `s_blk = e4m3_rne(clamp(amax(block) / 6 * s_enc, 2^-6, 448))`; element `v = x * s_enc / s_blk`.
  Decode `x' = q * s_blk / s_enc`.
A block whose amax is NaN (it holds NaN or Inf) gets a NaN scale (fp32 NaN, E8M0 0xFF,
E4M3 0x7F) and its elements the NaN code (FP8) or code 0 (FP4, which has no NaN).

FP4 packing: two E2M1 codes per uint8, element 2i in the low nibble, 2i+1 in the high nibble.

Random Hadamard transform (block b, a power of two in [16, 32768], along the last dim)
-----------------------------------------------------------------------------------------
`y = x @ (diag(s) H_b) * c_b` on consecutive 1 x b blocks, H_b Sylvester, `c_b = fp32(1/sqrt(b))`.
Evaluation order (fixed, so backends agree bit for bit): multiply by the signs, then the
butterfly stages h = 1, 2, 4, ..., b/2, each replacing (y[j], y[j+h]) with (y[j]+y[j+h], y[j]-y[j+h]),
then multiply by `c_b`. The inverse runs the butterfly, the `c_b` multiply, then the signs.
Signs: `s_j = -1` iff the top bit of word `j mod 4` of Philox4x32-10 with counter
`(j div 4, 0, 1, 0)` and the seed's key is set (a stream disjoint from the rounding bits);
no seed means all `s_j = +1`.

GEMM: `qmatmul(a, b) = dequantize(a) @ dequantize(b).T` in fp32, then cast to the output dtype.
"""
from __future__ import annotations

import math

import torch

from ..formats import E2M1, E4M3, ELEMENT_OF_DTYPE, Element, Format

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
NVFP4_ENC = 448.0 * 6.0
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NAN_CODE = {"e4m3": 0x7F, "e5m2": 0x7F, "bf16": 0x7FC0, "fp16": 0x7E00}


# ----------------------------------------------------------------------------- random bits
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


def _philox_word(index: torch.Tensor, stream: int, seed: int) -> torch.Tensor:
    q = index >> 2
    zero = torch.zeros_like(q)
    if stream == 0:  # rounding bits: counter (lo32(i/4), hi32(i/4), 0, 0)
        words = philox4x32(q & MASK32, q >> 32, zero, zero, seed)
    else:  # Hadamard signs: counter (j/4, 0, 1, 0)
        words = philox4x32(q, zero, zero + 1, zero, seed)
    lane = index & 3
    out = words[0]
    for w in range(1, 4):
        out = torch.where(lane == w, words[w], out)
    return out


def random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """r(seed, i) as int64 tensor holding uint32 values."""
    return _philox_word(index.to(torch.int64), 0, seed)


def element_index(R: int, K: int, inner: int, device=None) -> torch.Tensor:
    """Flat index in the caller's tensor of each element of the [R, K] working view."""
    r = torch.arange(R, dtype=torch.int64, device=device).unsqueeze(1)
    k = torch.arange(K, dtype=torch.int64, device=device).unsqueeze(0)
    return (r // inner) * (K * inner) + k * inner + (r % inner)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """u = (r >> 8) * 2^-24, as float64 (exact)."""
    return (bits >> 8).to(torch.float64) * 2.0**-24


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


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


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


def _unblocks(t: torch.Tensor, br: int, bk: int) -> torch.Tensor:
    nr, nk, _ = t.shape
    return t.reshape(nr, nk, br, bk).permute(0, 2, 1, 3).reshape(nr * br, nk * bk)


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


# ----------------------------------------------------------------------------- Hadamard
def hadamard_signs(block: int, seed: int | None, device=None) -> torch.Tensor:
    if seed is None or seed < 0:
        return torch.ones(block, dtype=torch.float32, device=device)
    word = _philox_word(torch.arange(block, dtype=torch.int64, device=device), 1, seed)
    return torch.where((word >> 31) == 1, -1.0, 1.0).to(torch.float32)


def hadamard_norm(block: int) -> float:
    """fp32(1/sqrt(b)), correctly rounded."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float64).to(torch.float32))


def _butterfly(y: torch.Tensor, block: int) -> torch.Tensor:
    lead = y.shape[:-1]
    h = 1
    while h < block:
        t = y.reshape(*lead, block // (2 * h), 2, h)
        a, c = t[..., 0, :], t[..., 1, :]
        y = torch.stack([a + c, a - c], dim=-2).reshape(*lead, block)
        h *= 2
    return y


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    """Random Hadamard transform of each 1 x block slice of the last dim of [R, K]; fp32 out."""
    R, K = x.shape
    y = x.to(torch.float32).reshape(R, K // block, block)
    s = hadamard_signs(block, seed, x.device)
    norm = torch.tensor(hadamard_norm(block), dtype=torch.float32)
    if not inverse:
        y = y * s
    y = _butterfly(y, block) * norm
    if inverse:
        y = y * s
    return y.reshape(R, K)


# ----------------------------------------------------------------------------- quantize
def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    """[R, K] float -> (data, scale, global_scale) per the module docstring."""
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


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit.qtensor.QParts` (2-D storage) -> a @ b.T in fp32."""
    return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)


def devices() -> tuple[str, ...]:
    return ("cpu", "cuda")


def unavailable() -> str | None:
    return None


# SeerAttention references (kept in their own file): attention_with_block_pool, block_sparse_attention
from .ref_attention import attention_with_block_pool, block_sparse_attention  # noqa: E402,F401
