"""quantize_dual on CPU: the C++ quantize kernel once per layout (no fused kernel).

This is the definition in `ref.quantize_dual` run on `cpu.quantize`: two passes over x plus a
materialized transpose, so it costs what two `quantize` calls cost. It exists so that a Linear
on CPU keeps the C++ kernels when it asks for both layouts at once.
"""
from __future__ import annotations

from ..ref.quantize_dual import two_layouts
from .quantize import quantize


def quantize_dual(x, row, col):
    return two_layouts(quantize, x, row, col)
