"""The quantized GEMM: both operands dequantized to fp32, one fp32 matmul."""
from __future__ import annotations

import torch

from .quantize import dequantize


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` (2-D storage) -> a @ b.T in fp32."""
    return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)
