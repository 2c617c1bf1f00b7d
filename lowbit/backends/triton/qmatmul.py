"""The quantized GEMM: operands decoded to fp32 by the Triton dequantize kernel, then a @ b.T."""
from __future__ import annotations

import torch

from .quantize import dequantize


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` -> a @ b.T with fp32 accumulation."""
    return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)
