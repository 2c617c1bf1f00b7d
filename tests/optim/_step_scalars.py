"""Random but valid per-tensor scalars of the elementwise step, in the order of kernels.SCALARS."""
import math

import torch

from lowbit.optim import kernels


def random_scalars(seed: int, clip: bool, zero: bool, skip: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
    f32 = kernels.f32
    b1, b2 = f32(0.8 + 0.19 * u[0]), f32(0.99 + 0.0099 * u[1])
    return (1.0 if clip else 0.0, f32(0.5 + u[2]), f32(0.1 + 0.5 * u[3]), f32(0.5 + u[4]), b1, f32(1 - b1), b2,
            f32(1 - b2), f32(1 / math.sqrt(0.01 + u[5])), f32(1e-8), f32(1 - 1e-4 * u[6]), f32(1e-3 * (1 + u[7])),
            1.0 if zero else 0.0, 1.0 if skip else 0.0)
