"""quantize / dequantize / cast on lowbit's CUDA kernels (csrc/cuda/quantize.cu, dequantize.cu, cast.cu, int4.cu)."""
from __future__ import annotations

import torch

from .. import codes
from ...formats import Format
from ._native import _C

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float_input(x: torch.Tensor) -> torch.Tensor:
    """fp32 / bf16 / fp16 go to the kernels as they are; other floats are made fp32 first, as ref does."""
    return x if x.dtype in INPUT_DTYPES else x.to(torch.float32)


def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    if fmt.kind == "int4":
        return _C.int4_quantize(*codes.int4_quantize_args(float_input(x), fmt, block, rounding, seed, inner))
    return _C.quantize(*codes.quantize_args(float_input(x), fmt, block, rounding, seed, scale_mode, global_amax,
                                            hadamard_block, inner))


def dequantize(data, scale, global_scale, fmt: Format, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    if fmt.kind == "int4":  # fp32, then rounded to dtype as ref does
        return _C.int4_dequantize(*codes.int4_dequantize_args(data, scale, fmt, block, K)).to(dtype)
    out = _C.dequantize(*codes.dequantize_args(data, scale, global_scale, fmt, block, K, dtype))
    return out if out.dtype == dtype else out.to(dtype)


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    return _C.cast(*codes.cast_args(float_input(x), dtype, rounding, seed))
