"""quantize_dual: both GEMM layouts of one 2-D operand, defined as two `quantize` calls.

A Linear layer reads its activation x [T, K] (and its output gradient) in two GEMMs that reduce
over different dims: fprop (dgrad) along K, wgrad along the tokens T. `quantize_dual(x, row, col)`
returns both quantizations, and is by definition exactly

    rowwise = quantize(pad(x, row.rows),         row...)   # [row.rows, K], blocks along K
    colwise = quantize(pad(x, col.rows).T,       col...)   # [K, col.rows], blocks along T

where `pad(x, n)` appends zero rows to x up to n rows, the transpose is materialized before it is
quantized, and each `quantize` takes its 2-D input as the caller's tensor (`inner` = 1). So the
stochastic-rounding word of a colwise element (k, t) is r(col.seed, k * col.rows + t), its flat
index in the padded transpose, and the colwise Hadamard transform runs along the tokens of that
padded transpose (its zero padding included). Each layout spec `row` / `col` holds `quantize`'s
arguments: fmt, block (br, bk) over its own [R, K] view, rounding, seed, scale_mode, hadamard
(0 = none) and `rows`, the padded row count of x. There is no `global_amax`: an NVFP4 layout
scales by the amax of the tensor it quantizes (after its Hadamard transform, if any).

Backends return (data, scale, global_scale) of the rowwise layout, then of the colwise one, bit
for bit as this composition does; the point of a backend kernel is to read x once or twice
instead of four times and never to materialize the transpose.
"""
from __future__ import annotations

import torch

from .quantize import quantize


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [T, K] with zero rows appended up to `rows` (x itself when nothing is added)."""
    extra = rows - x.shape[0]
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra > 0 else x


def two_layouts(quantize_fn, x: torch.Tensor, row, col) -> tuple[torch.Tensor, ...]:
    """The definition, on any backend's `quantize`: one call per layout (two passes over x and a transpose)."""
    xr = pad_rows(x, row.rows).contiguous()
    xc = pad_rows(x, col.rows).t().contiguous()
    out_r = quantize_fn(xr, row.fmt, tuple(row.block), row.rounding, row.seed, row.scale_mode, None, row.hadamard, 1)
    out_c = quantize_fn(xc, col.fmt, tuple(col.block), col.rounding, col.seed, col.scale_mode, None, col.hadamard, 1)
    return (*out_r, *out_c)


def quantize_dual(x: torch.Tensor, row, col) -> tuple[torch.Tensor, ...]:
    return two_layouts(quantize, x, row, col)
