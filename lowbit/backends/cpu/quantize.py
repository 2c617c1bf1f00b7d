"""quantize / dequantize / cast on the C++ kernels (csrc/cpu/quantize.cpp, cast.cpp)."""
from __future__ import annotations

import torch

from ...formats import ELEMENT_OF_DTYPE, Format
from ._native import _C


def native_input(x: torch.Tensor) -> torch.Tensor:
    """The kernels read fp32 / bf16 / fp16 in place; anything else is made fp32 first (as ref does)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.to(torch.float32)
    return x.contiguous()


def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    br, bk = block
    return _C.quantize(native_input(x), fmt.kind, fmt.elem.name, br, bk, rounding == "stochastic", seed,
                       scale_mode, global_amax, hadamard_block or 0, inner)


def dequantize(data, scale, global_scale, fmt: Format, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    br, bk = block
    out = _C.dequantize(data, scale, global_scale, fmt.kind, fmt.elem.name, br, bk, K)
    return out if dtype == torch.float32 else out.to(dtype)


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    elem = ELEMENT_OF_DTYPE[dtype]
    return _C.cast(x.to(torch.float32).contiguous(), elem.name, rounding == "stochastic", seed)
