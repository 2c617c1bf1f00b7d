"""The quantized GEMM: one Triton kernel (`_gemm`) that decodes both operands' tiles in registers."""
from __future__ import annotations

import torch

from ._support import check


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` (2-D storage) -> a @ b.T with fp32 accumulation.

    Matches ref.qmatmul up to fp32 accumulation order (the bound is in `_gemm`'s docstring), not bit for bit.
    """
    check(a.data, b.data)
    if "int4" in (a.fmt.kind, b.fmt.kind):  # no GEMM reads INT4's records: both dequantized, one fp32 mm (as ref)
        from .quantize import dequantize

        return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)
    from . import _gemm  # lazy: Triton reads TRITON_INTERPRET when a kernel module is first imported

    return _gemm.qmatmul(a, b, out_dtype)
