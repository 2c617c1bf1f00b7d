"""CUDA backend: the kernels of `lowbit._C_cuda` (csrc/cuda/*.cu), bit-exact with `lowbit.backends.ref`.

quantize / dequantize / cast / hadamard run lowbit's own kernels and give the same bits as the
reference on every format, rounding, block and input dtype; `qmatmul` picks a GEMM path
(`qmatmul.py`). Importing this package never needs a GPU or the compiled extension:
`unavailable()` then says why.
"""
from __future__ import annotations

import torch

from ._native import IMPORT_ERROR, _C  # noqa: F401
from .hadamard import hadamard  # noqa: F401
from .qmatmul import qmatmul  # noqa: F401
from .quantize import cast, dequantize, quantize  # noqa: F401


def devices() -> tuple[str, ...]:
    return ("cuda",)


def unavailable() -> str | None:
    if _C is None:
        return (f"the CUDA extension lowbit._C_cuda is not built ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}); "
                "`pip install` builds it when torch has CUDA and nvcc is found")
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None
