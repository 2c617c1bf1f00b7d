"""The random Hadamard transform on the C++ kernel (csrc/cpu/hadamard.cpp)."""
from __future__ import annotations

import torch

from .. import codes
from ..ref.hadamard import hadamard as hadamard_fp64
from ._native import _C
from .quantize import native_input


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    if x.dtype == torch.float64:  # the kernel computes in fp32; fp64 stays fp64 (the spec's torch path)
        return hadamard_fp64(x, block, seed, inverse)
    return _C.hadamard(*codes.hadamard_args(native_input(x), block, seed, inverse))
