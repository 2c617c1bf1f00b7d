"""The quantized GEMM on a CUDA GPU.

FP8 tensor-wise and row-wise operands run `torch._scaled_mm` (cuBLASLt FP8 GEMM, fp32 accumulation)
on GPUs with FP8 tensor cores (compute capability 8.9 and newer); every other case dequantizes
both operands with lowbit's kernels and multiplies in fp32 with `torch.mm`. The GEMM is the one op
whose result depends on the accumulation order, so it matches `ref.qmatmul` to within fp32
rounding of a K-term sum, not bit for bit.
"""
from __future__ import annotations

import warnings

import torch

from .quantize import OUT_NAMES, dequantize

_SCALED_MM_FAILED: set[tuple] = set()


def _fp8_layout(p, rows: int) -> str | None:
    """'tensor' or 'row' for FP8 operands _scaled_mm takes as they are, else None."""
    if p.fmt.kind != "fp8":
        return None
    if p.scale.numel() == 1 and tuple(p.block) == (rows, p.K):
        return "tensor"
    if tuple(p.block) == (1, p.K):
        return "row"
    return None


def _scaled_mm_plan(a, b, out_dtype: torch.dtype) -> str | None:
    M, N, K = a.data.shape[0], b.data.shape[0], a.K
    if not hasattr(torch, "_scaled_mm") or M % 16 or N % 16 or K % 16:
        return None
    if torch.cuda.get_device_capability(a.data.device) < (8, 9):
        return None
    la, lb = _fp8_layout(a, M), _fp8_layout(b, N)
    if la is None or la != lb:
        return None
    if a.fmt.elem.name == "e5m2" and b.fmt.elem.name == "e5m2":  # cuBLASLt has no E5M2 x E5M2 GEMM
        return None
    if la == "tensor" and out_dtype in OUT_NAMES:
        return "tensor"
    if la == "row" and out_dtype == torch.bfloat16 and a.fmt.elem.name == "e4m3" and b.fmt.elem.name == "e4m3":
        return "row"
    return None


def _scaled_mm(a, b, out_dtype: torch.dtype, plan: str) -> torch.Tensor:
    M, N = a.data.shape[0], b.data.shape[0]
    if plan == "tensor":
        sa = a.scale.reshape(()).to(torch.float32)
        sb = b.scale.reshape(()).to(torch.float32)
    else:
        sa = a.scale.reshape(M, 1).to(torch.float32).contiguous()
        sb = b.scale.reshape(1, N).to(torch.float32).contiguous()
    # b.data is [N, K] row-major, so its transpose is the column-major [K, N] operand cuBLASLt wants.
    return torch._scaled_mm(a.data.contiguous(), b.data.contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=out_dtype, use_fast_accum=False)


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` -> a @ b.T with fp32 accumulation."""
    plan = _scaled_mm_plan(a, b, out_dtype)
    key = (plan, a.fmt.name, b.fmt.name, out_dtype, a.data.device)
    if plan is not None and key not in _SCALED_MM_FAILED:
        try:
            return _scaled_mm(a, b, out_dtype, plan)
        except RuntimeError as exc:  # a cuBLASLt build without this FP8 combination: use the exact path
            _SCALED_MM_FAILED.add(key)
            warnings.warn(f"lowbit cuda qmatmul: torch._scaled_mm rejected {key[:4]} ({exc}); "
                          "dequantizing to fp32 instead", RuntimeWarning, stacklevel=2)
    A = dequantize(*a, torch.float32)
    B = dequantize(*b, torch.float32)
    return torch.mm(A, B.t()).to(out_dtype)
