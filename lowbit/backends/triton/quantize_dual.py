"""quantize_dual as Triton kernels (`_quantize_dual`): both layouts of x from two reads, no transpose."""
from __future__ import annotations

from ._support import check


def quantize_dual(x, row, col):
    check(x)
    for spec in (row, col):
        if spec.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {spec.rounding!r}")
        if spec.fmt.kind not in ("fp8", "mx", "nvfp4"):
            raise ValueError(f"fmt: unsupported kind {spec.fmt.kind!r}")
        if spec.scale_mode not in ("exact", "floor", "rceil"):
            raise ValueError(f"scale_mode: expected 'exact', 'floor' or 'rceil', got {spec.scale_mode!r}")
    from . import _quantize_dual  # lazy: Triton reads TRITON_INTERPRET when a kernel module is first imported

    return _quantize_dual.quantize_dual(x, row, col)
