"""Triton backend: the ops of `lowbit.backends.ref` as Triton kernels, bit for bit (qmatmul: up to
the order of its fp32 sums, within the bound derived in `_gemm`).

Runs on CUDA devices, and on CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1, which
Triton reads when a kernel module is first imported, i.e. at the first op call here). One module
per op family (`quantize`, `hadamard`, `qmatmul`, `attention`) imports its kernels (`_cast`,
`_quantize`, `_dequantize`, `_amax`, `_hadamard`, `_gemm`, `_attention_*`, sharing the bit-level helpers
of `_rounding`) lazily, so importing this package never needs a GPU or a working Triton.
"""
from __future__ import annotations

from ._support import devices, unavailable  # noqa: F401
from .hadamard import hadamard  # noqa: F401
from .qmatmul import qmatmul  # noqa: F401
from .quantize import cast, dequantize, quantize  # noqa: F401
