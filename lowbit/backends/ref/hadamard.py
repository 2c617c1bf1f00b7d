"""The random Hadamard transform (see the package docstring for the evaluation order)."""
from __future__ import annotations

import math

import torch

from ...bits import HADAMARD_STREAM, philox_word


def hadamard_signs(block: int, seed: int | None, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if seed is None or seed < 0:
        return torch.ones(block, dtype=dtype, device=device)
    word = philox_word(torch.arange(block, dtype=torch.int64, device=device), HADAMARD_STREAM, seed)
    return torch.where((word >> 31) == 1, -1.0, 1.0).to(dtype)


def hadamard_norm(block: int) -> float:
    """fp32(1/sqrt(b)), correctly rounded."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float64).to(torch.float32))


def _butterfly(y: torch.Tensor, block: int) -> torch.Tensor:
    lead = y.shape[:-1]
    h = 1
    while h < block:
        t = y.reshape(*lead, block // (2 * h), 2, h)
        a, c = t[..., 0, :], t[..., 1, :]
        y = torch.stack([a + c, a - c], dim=-2).reshape(*lead, block)
        h *= 2
    return y


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    """Random Hadamard transform of each 1 x block slice of the last dim of [R, K].

    fp32 out (fp64 in, fp64 out: computed in fp64 with c_b = 1/sqrt(b) rounded to fp64).
    """
    R, K = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dtype).reshape(R, K // block, block)
    s = hadamard_signs(block, seed, x.device, dtype)
    c = 1.0 / math.sqrt(block) if dtype == torch.float64 else hadamard_norm(block)
    norm = torch.tensor(c, dtype=dtype)
    if not inverse:
        y = y * s
    y = _butterfly(y, block) * norm
    if inverse:
        y = y * s
    return y.reshape(R, K)
