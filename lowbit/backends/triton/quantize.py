"""quantize / dequantize / cast as Triton kernels (`_quantize`, `_dequantize`, `_cast`)."""
from __future__ import annotations

import torch

from ...formats import ELEMENT_OF_DTYPE
from ..codes import code
from ._support import check


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    check(x)
    code("rounding", rounding)  # names are validated in one place (codes.py), as for the native backends
    from . import _cast  # lazy: Triton reads TRITON_INTERPRET when a kernel module is first imported

    return _cast.cast(x, ELEMENT_OF_DTYPE[dtype].name, dtype, rounding, seed)


def quantize(x, fmt, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    check(x)
    code("rounding", rounding)
    if fmt.kind == "int4":
        from . import _int4  # lazy, as above

        return _int4.quantize(x, fmt, tuple(block), rounding, seed, inner)
    code("kind", fmt.kind)
    code("scale_mode", scale_mode)
    from . import _quantize  # lazy, as above

    return _quantize.quantize(x, fmt, tuple(block), rounding, seed, scale_mode, global_amax, hadamard_block, inner)


def dequantize(data, scale, global_scale, fmt, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    check(data)
    if fmt.kind == "int4":
        from . import _int4  # lazy, as above

        return _int4.dequantize(data, scale, fmt, tuple(block), K, dtype)
    from . import _dequantize  # lazy, as above

    return _dequantize.dequantize(data, scale, global_scale, fmt, tuple(block), K, dtype)
