"""The random Hadamard transform as a Triton kernel (`_hadamard`)."""
from __future__ import annotations

import torch

from ..ref.hadamard import hadamard as hadamard_fp64
from ._support import check


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    check(x)
    if x.dtype == torch.float64:  # the kernel computes in fp32; fp64 stays fp64 (the spec's torch path)
        return hadamard_fp64(x, block, seed, inverse)
    from . import _hadamard  # lazy: Triton reads TRITON_INTERPRET when a kernel module is first imported

    return _hadamard.hadamard(x, block, seed, inverse)
