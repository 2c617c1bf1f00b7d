"""The quantized GEMM on CPU: emulation, bit-exact to ref (the C++ dequantize, then an fp32 mm)."""
from __future__ import annotations

import torch

from .quantize import dequantize


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts`: dequantize both to fp32, then the same mm as ref."""
    return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)
