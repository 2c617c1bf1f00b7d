"""Pure-PyTorch reference backend: the executable spec every other backend matches bit for bit.

One module per op family: `quantize` (quantize, dequantize, cast), `hadamard`, `qmatmul`,
`attention` (SeerAttention), `optim` (the Stable-SPAM step); the Philox words and FP4 packing
live in `lowbit.bits`.

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
`y = x @ (diag(s) H_b) * c_b` on consecutive 1 x b blocks, H_b Sylvester, `c_b = fp32(1/sqrt(b))`
(fp64 inputs are transformed in fp64, with `c_b` rounded to fp64, and stay fp64).
Evaluation order (fixed, so backends agree bit for bit): multiply by the signs, then the
butterfly stages h = 1, 2, 4, ..., b/2, each replacing (y[j], y[j+h]) with (y[j]+y[j+h], y[j]-y[j+h]),
then multiply by `c_b`. The inverse runs the butterfly, the `c_b` multiply, then the signs.
Signs: `s_j = -1` iff the top bit of word `j mod 4` of Philox4x32-10 with counter
`(j div 4, 0, 1, 0)` and the seed's key is set (a stream disjoint from the rounding bits);
no seed means all `s_j = +1`.

INT4 (Stable-SPAM's formats; `int4` module)
-------------------------------------------
Groups are 1 x g blocks along K (g divides K; 256 by default). x is made fp32 first, then every
step below is one fp32 operation, left to right; `FLT(c)` is the fp32 nearest c.
`round(v)`: n = floor(|v|), frac = |v| - n (exact), n + 1 iff frac > 1/2 or (frac == 1/2 and n odd)
  (nearest, ties to even) or iff frac > u (stochastic, u as above with the element's index i), then
  v's sign (-0 -> 0).
int4_weight (asymmetric uint4, codes [0, 15]): `d = max_j w_j - min_j w_j`, `d = max(d, FLT(1e-5))`,
  `s = d / 15`; zero point `z = clamp(-round(min_j w_j / s), 0, 15)`, always to nearest;
  `q_j = clamp(round(w_j / s) + z, 0, 15)`. Decode `w'_j = (q_j - z) * s`. Record `(s, z)`.
int4_act (symmetric int4, codes [-8, 7]): i0 = position of the largest |x_j|, i1 = that of the
  largest of the rest (ties: the lowest position), kept exactly: v0 = x_i0, v1 = x_i1, and
  `y_j = x_j` except `y_i0 = y_i1 = 0`. `s = max(max_j |y_j|, FLT(1e-6))`, `t = 1 / s * 7` (two
  roundings: how PyTorch evaluates the official `7 / scale`), `q_j = clamp(round(y_j * t), -8, 7)`
  (0 at i0, i1). Decode `x'_j = q_j * s / 7`, then `x'_i0 = v0`, `x'_i1 = v1`. Record
  `(s, v0, v1, i0, i1)`, the positions in the group as fp32 integers.
Storage: codes two per byte as FP4 (int4 as two's complement nibbles); `scale` is the fp32 record
per group, [R, K / g, 2] or [R, K / g, 5]; `global_scale` is 1 (unused). A group holding NaN or Inf
gets codes 0 and the record (NaN, 0) or (NaN, NaN, NaN, 0, 1), NaN = 0x7FC00000: it decodes to NaN.

GEMM: `qmatmul(a, b) = dequantize(a) @ dequantize(b).T` in fp32, then cast to the output dtype.
"""
from __future__ import annotations

from ...bits import element_index, pack_fp4, philox4x32, random_bits, uniform_from_bits, unpack_fp4  # noqa: F401
from .attention import attention_with_block_pool, block_sparse_attention  # noqa: F401
from .hadamard import hadamard, hadamard_norm, hadamard_signs  # noqa: F401
from .qmatmul import qmatmul  # noqa: F401
from .quantize import (block_amax, cast, decode_fp4, dequantize, encode_elements, encode_fp4, fp8_scale,  # noqa: F401
                       mx_scale_exponent, nvfp4_block_scale, nvfp4_global_scale, quantize, round_to_element)


def devices() -> tuple[str, ...]:
    return ("cpu", "cuda")


def unavailable() -> str | None:
    return None
