"""The random Hadamard transform on lowbit's CUDA kernel (csrc/cuda/hadamard.cu)."""
from __future__ import annotations

import torch

from ..ref.hadamard import hadamard as hadamard_fp64
from ._native import _C
from .quantize import float_input


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    if x.dtype == torch.float64:  # the kernel computes in fp32; fp64 stays fp64 (the spec's torch path)
        return hadamard_fp64(x, block, seed, inverse)
    if seed is not None and seed >= 2**63:
        raise ValueError(f"seed: expected an int below 2^63 or None, got {seed}")
    return _C.hadamard(float_input(x), int(block), -1 if seed is None or seed < 0 else int(seed), bool(inverse))
