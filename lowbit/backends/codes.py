"""The integer codes the native kernels take, and the argument lists of their ops.

The values must match csrc/include/lowbit/enums.h: `lowbit._C.codes()` and `lowbit._C_cuda.codes()`
return the C++ tables, and the tests compare them with `TABLES`. Names are turned into codes here,
once; the extensions take ints and only check their range.

`lowbit._C` and `lowbit._C_cuda` take the same argument list for an op, and the CPU and CUDA
backends build it with the same function below:
    quantize(x, kind, elem, br, bk, rounding, seed, scale_mode, global_amax, hadamard_block, inner)
    dequantize(data, scale, global_scale, kind, elem, br, bk, K, out_dtype)
    cast(x, elem, rounding, seed)
    hadamard(x, block, seed, inverse)
    int4_quantize(x, weight, g, rounding, seed, inner)     (INT4: weight = the asymmetric uint4 format)
    int4_dequantize(data, scale, weight, g, K)             (fp32 out)
seed is the 64-bit Philox key as the signed int64 with the same bits (`seed64`), or None for
hadamard's plain transform; global_amax is None or a one-element fp32 tensor.
"""
from __future__ import annotations

import torch

KIND = {"fp8": 0, "mx": 1, "nvfp4": 2}
ELEM = {"e4m3": 0, "e5m2": 1, "e2m1": 2, "bf16": 3, "fp16": 4}
ROUNDING = {"nearest": 0, "stochastic": 1}
SCALE_MODE = {"exact": 0, "floor": 1, "rceil": 2}
OUT_DTYPE = {"float32": 0, "bfloat16": 1, "float16": 2}
TABLES = {"kind": KIND, "elem": ELEM, "rounding": ROUNDING, "scale_mode": SCALE_MODE, "out_dtype": OUT_DTYPE}

# The dtypes dequantize writes itself (others: fp32, converted by the caller).
OUT_DTYPES = {torch.float32: OUT_DTYPE["float32"], torch.bfloat16: OUT_DTYPE["bfloat16"],
              torch.float16: OUT_DTYPE["float16"]}
# The dtypes cast rounds to, as elements.
CAST_ELEMS = {torch.bfloat16: ELEM["bf16"], torch.float16: ELEM["fp16"],
              torch.float8_e4m3fn: ELEM["e4m3"], torch.float8_e5m2: ELEM["e5m2"]}


class CodeError(ValueError, RuntimeError):
    """A name with no code. Also a RuntimeError: the extensions raised that for bad names before
    the names were parsed here."""


def code(arg: str, name: str) -> int:
    """The code of `name` for argument `arg` ("kind", "elem", "rounding", "scale_mode", "out_dtype")."""
    table = TABLES[arg]
    if name not in table:
        raise CodeError(f"{arg}: expected one of {list(table)}, got {name!r}")
    return table[name]


def seed64(seed: int) -> int:
    """The Philox key (seed mod 2^64, as the spec reads it) as the signed int64 with the same bits."""
    s = int(seed) % 2**64
    return s - 2**64 if s >= 2**63 else s


def quantize_args(x, fmt, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner) -> tuple:
    br, bk = block
    if global_amax is not None:
        global_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(1)
    return (x, code("kind", fmt.kind), code("elem", fmt.elem.name), int(br), int(bk), code("rounding", rounding),
            seed64(seed), code("scale_mode", scale_mode), global_amax, int(hadamard_block or 0), int(inner))


def dequantize_args(data, scale, global_scale, fmt, block, K, dtype) -> tuple:
    br, bk = block
    return (data, scale, global_scale.to(torch.float32), code("kind", fmt.kind), code("elem", fmt.elem.name),
            int(br), int(bk), int(K), OUT_DTYPES.get(dtype, OUT_DTYPE["float32"]))


def cast_args(x, dtype, rounding, seed) -> tuple:
    if dtype not in CAST_ELEMS:
        raise TypeError(f"dtype: expected one of {list(CAST_ELEMS)}, got {dtype!r}")
    return (x, CAST_ELEMS[dtype], code("rounding", rounding), seed64(seed))


def int4_quantize_args(x, fmt, block, rounding, seed, inner) -> tuple:
    return (x, not fmt.elem.signed, int(block[1]), code("rounding", rounding), seed64(seed), int(inner))


def int4_dequantize_args(data, scale, fmt, block, K) -> tuple:
    return (data, scale.to(torch.float32), not fmt.elem.signed, int(block[1]), int(K))


def hadamard_args(x, block, seed, inverse) -> tuple:
    """seed None or negative: the plain transform (as in the spec)."""
    return (x, int(block), None if seed is None or seed < 0 else seed64(seed), bool(inverse))
