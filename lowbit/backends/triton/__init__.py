"""Triton backend: the ops of ref.py as Triton kernels, bit for bit.

Runs on CUDA devices, and on CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1,
which Triton reads when a kernel module is first imported, i.e. at the first op call here).
The kernels live one per module (`_cast`, `_hadamard`, `_amax`, `_quantize`, `_dequantize`) and
share the bit-level helpers of `_rounding`; they are imported lazily, so importing this package
never needs a GPU or a working Triton.
"""
from __future__ import annotations

import os

import torch

from ...formats import ELEMENT_OF_DTYPE

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except Exception as exc:  # a missing or broken Triton must not break lowbit
    _IMPORT_ERROR = f"triton is not importable: {exc}"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if _interpreted() else ("cuda",)


def unavailable() -> str | None:
    return _IMPORT_ERROR


def _check(*tensors: torch.Tensor) -> None:
    if _IMPORT_ERROR:
        raise RuntimeError(f"triton backend: {_IMPORT_ERROR}")
    for t in tensors:
        if t.device.type not in devices():
            raise RuntimeError(f"triton backend: tensors on {t.device.type} need "
                               f"{'a CUDA device' if t.device.type != 'cpu' else 'TRITON_INTERPRET=1'}")
        if t.device.type == "cpu" and not _triton_interprets():
            raise RuntimeError("triton backend: TRITON_INTERPRET=1 was set after triton was imported; "
                               "Triton reads it at import, so set it before anything imports triton")


def _triton_interprets() -> bool:
    """Whether Triton's own library functions were built for the interpreter."""
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    _check(x)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    from . import _cast

    return _cast.cast(x, ELEMENT_OF_DTYPE[dtype].name, dtype, rounding, seed)


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    _check(x)
    from . import _hadamard

    return _hadamard.hadamard(x, block, seed, inverse)


def quantize(x, fmt, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    _check(x)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    if fmt.kind not in ("fp8", "mx", "nvfp4"):
        raise ValueError(f"fmt: unsupported kind {fmt.kind!r}")
    if scale_mode not in ("exact", "floor", "rceil"):
        raise ValueError(f"scale_mode: expected 'exact', 'floor' or 'rceil', got {scale_mode!r}")
    from . import _quantize

    return _quantize.quantize(x, fmt, tuple(block), rounding, seed, scale_mode, global_amax, hadamard_block, inner)


def dequantize(data, scale, global_scale, fmt, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    _check(data)
    from . import _dequantize

    return _dequantize.dequantize(data, scale, global_scale, fmt, tuple(block), K, dtype)


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit.qtensor.QParts`: decoded to fp32 by the kernel, then a @ b.T."""
    return torch.mm(dequantize(*a, torch.float32), dequantize(*b, torch.float32).t()).to(out_dtype)
