"""quantize / dequantize / cast on lowbit's CUDA kernels (csrc/cuda/quantize.cu, dequantize.cu, cast.cu)."""
from __future__ import annotations

import torch

from ...formats import Format
from ._native import _C

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CAST_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def seed64(seed: int) -> int:
    """The Philox key as the signed int64 the extension takes (the same 64 bits the ref backend uses)."""
    s = int(seed) % 2**64
    return s - 2**64 if s >= 2**63 else s


def float_input(x: torch.Tensor) -> torch.Tensor:
    """fp32 / bf16 / fp16 go to the kernels as they are; other floats are made fp32 first, as ref does."""
    return x if x.dtype in INPUT_DTYPES else x.to(torch.float32)


def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    br, bk = block
    if global_amax is not None:
        global_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(1)
    return _C.quantize(float_input(x), fmt.kind, fmt.elem.name, int(br), int(bk), rounding, seed64(seed),
                       scale_mode, global_amax, int(hadamard_block or 0), int(inner))


def dequantize(data, scale, global_scale, fmt: Format, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    br, bk = block
    name = OUT_NAMES.get(dtype, "float32")
    out = _C.dequantize(data, scale, global_scale.to(torch.float32), fmt.kind, fmt.elem.name, int(br), int(bk),
                        int(K), name)
    return out if out.dtype == dtype else out.to(dtype)


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    if dtype not in _CAST_NAMES:
        raise TypeError(f"dtype: expected one of {list(_CAST_NAMES)}, got {dtype!r}")
    return _C.cast(float_input(x), _CAST_NAMES[dtype], rounding, seed64(seed))
