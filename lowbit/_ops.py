"""torch.library custom ops (schemas, dispatch to the chosen backend, fake impls for tracing).

`backend` is a name or "auto"; it is resolved when the op runs, so tracing never touches the registry.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends
from .formats import FORMATS, Format


class QParts(NamedTuple):
    """What a backend sees: storage as [R, K] (or [R, K/2] packed), scales [R/br, K/bk]."""

    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    fmt: Format
    block: tuple[int, int]
    K: int


@torch.library.custom_op("lowbit::quantize", mutates_args=())
def quantize(x: Tensor, fmt: str, block: list[int], rounding: str, seed: int, scale_mode: str,
             global_amax: Optional[Tensor], hadamard: int, inner: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    f = FORMATS[fmt]
    return backends.for_op("quantize", x.device.type, backend)(x, f, tuple(block), rounding, seed, scale_mode, global_amax, hadamard, inner)


@quantize.register_fake
def _(x, fmt, block, rounding, seed, scale_mode, global_amax, hadamard, inner, backend):
    f = FORMATS[fmt]
    R, K = x.shape
    data = x.new_empty((R, K // 2 if f.packed else K), dtype=f.data_dtype)
    record = (f.scale_fields,) if f.scale_fields else ()  # INT4: a record of fields per group
    scale = x.new_empty((R // block[0], K // block[1]) + record, dtype=f.scale_dtype)
    return data, scale, x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(data: Tensor, scale: Tensor, global_scale: Tensor, fmt: str, block: list[int], K: int,
               dtype: torch.dtype, backend: str) -> Tensor:
    return backends.for_op("dequantize", data.device.type, backend)(data, scale, global_scale, FORMATS[fmt], tuple(block), K, dtype)


@dequantize.register_fake
def _(data, scale, global_scale, fmt, block, K, dtype, backend):
    return data.new_empty((data.shape[0], K), dtype=dtype)


@torch.library.custom_op("lowbit::cast", mutates_args=())
def cast(x: Tensor, dtype: torch.dtype, rounding: str, seed: int, backend: str) -> Tensor:
    return backends.for_op("cast", x.device.type, backend)(x, dtype, rounding, seed)


@cast.register_fake
def _(x, dtype, rounding, seed, backend):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: Tensor, block: int, seed: int, inverse: bool, backend: str) -> Tensor:
    return backends.for_op("hadamard", x.device.type, backend)(x, block, None if seed < 0 else seed, inverse)


@hadamard.register_fake
def _(x, block, seed, inverse, backend):
    return x.new_empty(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("lowbit::qmatmul", mutates_args=())
def qmatmul(a_data: Tensor, a_scale: Tensor, a_global_scale: Tensor, a_fmt: str, a_block: list[int],
            b_data: Tensor, b_scale: Tensor, b_global_scale: Tensor, b_fmt: str, b_block: list[int],
            K: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    a = QParts(a_data, a_scale, a_global_scale, FORMATS[a_fmt], tuple(a_block), K)
    b = QParts(b_data, b_scale, b_global_scale, FORMATS[b_fmt], tuple(b_block), K)
    return backends.for_op("qmatmul", a_data.device.type, backend)(a, b, out_dtype)


@qmatmul.register_fake
def _(a_data, a_scale, a_global_scale, a_fmt, a_block, b_data, b_scale, b_global_scale, b_fmt, b_block, K,
      out_dtype, backend):
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


class LayoutSpec(NamedTuple):
    """One layout of `quantize_dual` as backends see it (see `lowbit.backends.ref.quantize_dual`)."""

    fmt: Format
    block: tuple[int, int]
    rounding: str
    seed: int
    scale_mode: str
    hadamard: int
    rows: int


@torch.library.custom_op("lowbit::quantize_dual", mutates_args=())
def quantize_dual(x: Tensor, row_fmt: str, row_block: list[int], row_rounding: str, row_seed: int,
                  row_scale_mode: str, row_hadamard: int, row_rows: int,
                  col_fmt: str, col_block: list[int], col_rounding: str, col_seed: int,
                  col_scale_mode: str, col_hadamard: int, col_rows: int,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    row = LayoutSpec(FORMATS[row_fmt], tuple(row_block), row_rounding, row_seed, row_scale_mode, row_hadamard, row_rows)
    col = LayoutSpec(FORMATS[col_fmt], tuple(col_block), col_rounding, col_seed, col_scale_mode, col_hadamard, col_rows)
    return backends.for_op("quantize_dual", x.device.type, backend)(x, row, col)


@quantize_dual.register_fake
def _(x, row_fmt, row_block, row_rounding, row_seed, row_scale_mode, row_hadamard, row_rows,
      col_fmt, col_block, col_rounding, col_seed, col_scale_mode, col_hadamard, col_rows, backend):
    K = x.shape[1]
    out = []
    for fmt, block, R, Kq in ((row_fmt, row_block, row_rows, K), (col_fmt, col_block, K, col_rows)):
        f = FORMATS[fmt]
        out += [x.new_empty((R, Kq // 2 if f.packed else Kq), dtype=f.data_dtype),
                x.new_empty((R // block[0], Kq // block[1]), dtype=f.scale_dtype),
                x.new_empty((), dtype=torch.float32)]
    return tuple(out)
