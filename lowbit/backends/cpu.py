"""CPU backend: the C++ / OpenMP kernels of `lowbit._C` (csrc/cpu), bit-exact to `ref.py`.

Same function signatures as `ref.py`; every output is a freshly allocated tensor.
"""
from __future__ import annotations

import torch

from ..formats import ELEMENT_OF_DTYPE, Format

try:
    from .. import _C
    _IMPORT_ERROR = None
except Exception as exc:  # no compiler at install time, or a broken build: fall back to ref
    _C = None
    _IMPORT_ERROR = f"lowbit._C could not be imported ({type(exc).__name__}: {exc}); rebuild with `pip install -e .`"


def devices() -> tuple[str, ...]:
    return ("cpu",)


def unavailable() -> str | None:
    return _IMPORT_ERROR


def _native_input(x: torch.Tensor) -> torch.Tensor:
    """The kernels read fp32 / bf16 / fp16 in place; anything else is made fp32 first (as ref does)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.to(torch.float32)
    return x.contiguous()


def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    br, bk = block
    return _C.quantize(_native_input(x), fmt.kind, fmt.elem.name, br, bk, rounding == "stochastic", seed,
                       scale_mode, global_amax, hadamard_block or 0, inner)


def dequantize(data, scale, global_scale, fmt: Format, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    br, bk = block
    out = _C.dequantize(data, scale, global_scale, fmt.kind, fmt.elem.name, br, bk, K)
    return out if dtype == torch.float32 else out.to(dtype)


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    elem = ELEMENT_OF_DTYPE[dtype]
    return _C.cast(x.to(torch.float32).contiguous(), elem.name, rounding == "stochastic", seed)


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    return _C.hadamard(_native_input(x), block, -1 if seed is None or seed < 0 else seed, bool(inverse))


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit.qtensor.QParts`: dequantize both to fp32, then the same mm as ref."""
    return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)


# Stable-SPAM step kernels (csrc/cpu/optim.cpp), used by lowbit.optim.kernels; bit-exact with its spec.
if _C is not None and hasattr(_C, "optim_adam_step"):
    def optim_grad_stats(grads):
        return _C.optim_grad_stats(grads)

    def optim_clip_stats(grads, mh, r):
        return _C.optim_clip_stats(grads, mh, r)

    def optim_adam_step(params, grads, ms, vs, scalars):
        _C.optim_adam_step(params, grads, ms, vs, scalars)


# The fused step on bf16 / fp8 / int8 moments (csrc/cpu/optim_lowprec.cpp), used by lowbit.optim.kernels.
if _C is not None and hasattr(_C, "optim_lowprec_step"):
    def optim_lowprec_step(state_dtype, params, ms, m_scales, vs, v_scales, grads, pieces, scalars, seeds, books):
        _C.optim_lowprec_step(state_dtype, params, ms, m_scales, vs, v_scales, grads, pieces, scalars, seeds, books)
