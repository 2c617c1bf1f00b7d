"""quantize / dequantize / cast as Triton kernels (`_quantize`, `_dequantize`, `_cast`)."""
from __future__ import annotations

import torch

from ...formats import ELEMENT_OF_DTYPE
from ._support import check


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    check(x)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    from . import _cast  # lazy: Triton reads TRITON_INTERPRET when a kernel module is first imported

    return _cast.cast(x, ELEMENT_OF_DTYPE[dtype].name, dtype, rounding, seed)


def quantize(x, fmt, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    check(x)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    if fmt.kind not in ("fp8", "mx", "nvfp4"):
        raise ValueError(f"fmt: unsupported kind {fmt.kind!r}")
    if scale_mode not in ("exact", "floor", "rceil"):
        raise ValueError(f"scale_mode: expected 'exact', 'floor' or 'rceil', got {scale_mode!r}")
    from . import _quantize  # lazy, as above

    return _quantize.quantize(x, fmt, tuple(block), rounding, seed, scale_mode, global_amax, hadamard_block, inner)


def dequantize(data, scale, global_scale, fmt, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    check(data)
    from . import _dequantize  # lazy, as above

    return _dequantize.dequantize(data, scale, global_scale, fmt, tuple(block), K, dtype)
