"""The quantized GEMM on a CUDA GPU: the path `lowbit.backends.gemm` picks for the operands and the GPU.

scaled_mm runs the tensor cores on the codes and scales (`scaled_mm.py`); where the GPU has no
instruction for the format, the Triton GEMM reads the packed codes and scales itself; only where
neither can run are both operands dequantized and multiplied with torch.mm in fp32, with a
warning once per format pair saying why. Errors from scaled_mm surface: the table decides up
front what scaled_mm can run, so a failure there is a real one (an OOM, a broken install).
The GEMM is the one op whose result depends on the accumulation order, so it matches
`ref.qmatmul` to within fp32 rounding of a K-term sum, not bit for bit.
"""
from __future__ import annotations

import warnings

import torch

from .. import gemm
from .quantize import dequantize
from .scaled_mm import scaled_mm

_WARNED: set[tuple] = set()


def _describe(p) -> str:
    return f"{p.fmt.name} {gemm.layout(p.fmt, gemm.tile_of(p))}"


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` -> a @ b.T with fp32 accumulation."""
    plan = gemm.plan_for(a, b, out_dtype, torch.cuda.get_device_capability(a.data.device))
    if plan.path == "scaled_mm":
        return scaled_mm(plan, a, b, out_dtype)
    if plan.path == "triton":
        from ..triton.qmatmul import qmatmul as triton_qmatmul

        return triton_qmatmul(a, b, out_dtype)
    key = (_describe(a), _describe(b), plan.reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"lowbit qmatmul: {key[0]} x {key[1]} dequantizes to fp32 and runs torch.mm: {plan.reason}",
                      RuntimeWarning, stacklevel=2)
    A = dequantize(*a, torch.float32)
    B = dequantize(*b, torch.float32)
    return torch.mm(A, B.t()).to(out_dtype)
