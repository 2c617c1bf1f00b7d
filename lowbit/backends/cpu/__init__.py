"""CPU backend: the C++ / OpenMP kernels of `lowbit._C` (csrc/cpu), bit-exact to `lowbit.backends.ref`.

One module per op family (`quantize`, `hadamard`, `qmatmul`, `attention`, `optim`), each with the
signatures of the matching `ref` module; every output is a freshly allocated tensor.
"""
from __future__ import annotations

from ._native import IMPORT_ERROR, _C  # noqa: F401
from .hadamard import hadamard  # noqa: F401
from .qmatmul import qmatmul  # noqa: F401
from .quantize import cast, dequantize, quantize  # noqa: F401


def devices() -> tuple[str, ...]:
    return ("cpu",)


def unavailable() -> str | None:
    return IMPORT_ERROR
