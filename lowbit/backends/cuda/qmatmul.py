"""The quantized GEMM on a CUDA GPU: the path `lowbit.backends.gemm` picks for the operands and the GPU.

scaled_mm runs the tensor cores on the codes and scales (`scaled_mm.py`); where the GPU has no
instruction for the format, the Triton GEMM reads the packed codes and scales itself; only where
neither can run are both operands dequantized and multiplied with torch.mm in fp32, with a
warning once per format pair saying why.

The table decides up front what scaled_mm can run; where PyTorch still refuses a call with its
documented "unsupported" error (`scaled_mm.unsupported`: no kernel for this GPU, cuBLASLt or build),
that (format pair, layouts, output dtype, capability) is recorded as refused for the rest of the
process, a warning names PyTorch's reason once, and this and every later call take the table's next
path (Triton, else dequantize + mm). Every other error - an out-of-memory included - propagates
unchanged and is not recorded, so the next call tries scaled_mm again.
The GEMM is the one op whose result depends on the accumulation order, so it matches
`ref.qmatmul` to within fp32 rounding of a K-term sum, not bit for bit.
"""
from __future__ import annotations

import warnings

import torch

from .. import gemm
from .quantize import dequantize
from .scaled_mm import scaled_mm, unsupported

_WARNED: set[tuple] = set()
_REFUSED: dict[tuple, str] = {}  # (a desc, b desc, out dtype, capability) -> PyTorch's refusal


def _describe(p) -> str:
    return f"{p.fmt.name} {gemm.layout(p.fmt, gemm.tile_of(p))}"


def _warn_once(key: tuple, message: str, stacklevel: int) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def _try_scaled_mm(plan, a, b, out_dtype, cap) -> tuple[torch.Tensor | None, gemm.Plan | None]:
    """(result, None), or (None, the next Plan) when this combination is refused, now or earlier."""
    key = (_describe(a), _describe(b), out_dtype, cap)
    refused = _REFUSED.get(key)
    if refused is None:
        try:
            return scaled_mm(plan, a, b, out_dtype), None
        except (RuntimeError, ValueError) as exc:
            refused = unsupported(exc)
            if refused is None:
                raise
            _REFUSED[key] = refused
    sm = f"sm_{cap[0]}{cap[1]}"
    nxt = gemm.after_scaled_mm(f"{plan.api} refused it on {sm}: {refused}", cap)
    # one warning for the refusal, which also covers the dequant path's own warning
    _warn_once((key[0], key[1], nxt.reason),
               f"lowbit qmatmul: {key[0]} x {key[1]} -> {str(out_dtype)[6:]} on {sm}: {plan.api} refused it "
               f"({refused}); {nxt.path} runs it from now on in this process", stacklevel=3)
    return None, nxt


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit._ops.QParts` -> a @ b.T with fp32 accumulation."""
    cap = gemm.capability_of(torch.cuda.get_device_capability(a.data.device))
    plan = gemm.plan_for(a, b, out_dtype, cap)
    if plan.path == "scaled_mm":
        out, plan = _try_scaled_mm(plan, a, b, out_dtype, cap)
        if out is not None:
            return out
    if plan.path == "triton":
        from ..triton.qmatmul import qmatmul as triton_qmatmul

        return triton_qmatmul(a, b, out_dtype)
    key = (_describe(a), _describe(b), plan.reason)
    _warn_once(key, f"lowbit qmatmul: {key[0]} x {key[1]} dequantizes to fp32 and runs torch.mm: {plan.reason}",
               stacklevel=2)
    A = dequantize(*a, torch.float32)
    B = dequantize(*b, torch.float32)
    return torch.mm(A, B.t()).to(out_dtype)
