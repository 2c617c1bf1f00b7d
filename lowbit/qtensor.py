"""QTensor: quantized data + scales + format."""
from __future__ import annotations

import math

import torch

from . import _ops, backends
from .bits import pack_fp4, unpack_fp4
from .formats import Format
from ._ops import QParts


class QTensor:
    """A tensor quantized along `axis`.

    data:  codes with `axis` moved last (FP8: float8 tensor; FP4: uint8, element 2i in the low
           nibble of byte i, 2i+1 in the high nibble), shape = shape with axis moved last
           (last dim halved when packed).
    scale: per-block scales, shape [R / br, K / bk] over the [R, K] view (0-d when tensor-wise);
           fp32 for FP8 (x ~ q * scale), E8M0 exponent bytes (uint8) for MX, float8_e4m3fn for NVFP4;
           INT4: [R, K / g, fields], an fp32 record per group (`lowbit.backends.ref`, "INT4").
    global_scale: NVFP4 only, the fp32 encode scale 448 * 6 / amax; None otherwise.
    block: (br, bk) over the [R, K] view.
    """

    def __init__(self, data, scale, global_scale, fmt: Format, shape, axis: int, block):
        self.data = data
        self.scale = scale
        self.global_scale = global_scale
        self.fmt = fmt
        self.shape = torch.Size(shape)
        self.axis = axis
        self.block = tuple(block)

    @property
    def K(self) -> int:
        return self.shape[self.axis]

    @property
    def R(self) -> int:
        return math.prod(self.shape) // self.K if self.K else math.prod(s for i, s in enumerate(self.shape) if i != self.axis)

    @property
    def moved_shape(self) -> torch.Size:
        dims = list(self.shape)
        k = dims.pop(self.axis)
        return torch.Size(dims + [k])

    @property
    def tensorwise(self) -> bool:
        return self.scale.dim() == 0

    def parts(self) -> QParts:
        R, K = self.R, self.K
        data = self.data.reshape(R, K // 2 if self.fmt.packed else K)
        br, bk = self.block
        record = self.scale.shape[2:]  # INT4's per-group record (fmt.scale_fields)
        scale = self.scale.reshape(R // br if br else 0, K // bk if bk else 0, *record) if not self.tensorwise \
            else self.scale.reshape(1, 1)
        gs = self.global_scale if self.global_scale is not None else torch.ones((), dtype=torch.float32, device=data.device)
        return QParts(data, scale, gs, self.fmt, self.block, K)

    def dequantize(self, dtype: torch.dtype = torch.float32, *, backend: str | None = None) -> torch.Tensor:
        """Decode to `dtype` in the original layout (`backend`: a name, or None for the registry's choice)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        if self.data.numel() == 0:
            return torch.zeros(self.shape, dtype=dtype, device=self.data.device)
        p = self.parts()
        out = _ops.dequantize(p.data, p.scale, p.global_scale, self.fmt.name, list(self.block), p.K, dtype,
                              backends.requested(backend))
        return out.reshape(self.moved_shape).movedim(-1, self.axis)

    def t(self) -> "QTensor":
        """Transpose of a 2-D QTensor quantized along its last dim, itself quantized along its last dim.

        Exact (no requantization) only where the blocks are square tiles or the whole tensor,
        as NVFP4 16x16 and FP8 128x128 weights are built to be.
        """
        if len(self.shape) != 2 or self.axis != 1:
            raise ValueError("t(): expected a 2-D QTensor quantized along its last dim (axis=-1)")
        br, bk = self.block
        if self.fmt.kind == "int4":
            raise ValueError("t(): INT4 groups (and their kept values) lie along K; quantize the source along the "
                             "other axis instead")
        if not (self.tensorwise or br == bk):
            raise ValueError(
                f"t(): blocks {self.block} are not square, so the transpose is not the same quantization; "
                "quantize the source along the other axis instead")
        R, K = self.shape
        if self.fmt.packed:
            if R % 2:
                raise ValueError(f"t(): FP4 transpose needs an even number of rows, got {R}")
            data = pack_fp4(unpack_fp4(self.data).t().contiguous())
        else:
            data = self.data.t().contiguous()
        scale = self.scale if self.tensorwise else self.scale.t().contiguous()
        block = (K, R) if self.tensorwise else self.block
        return QTensor(data, scale, self.global_scale, self.fmt, (K, R), 1, block)

    def __repr__(self) -> str:
        return (f"QTensor(fmt={self.fmt.name}, shape={tuple(self.shape)}, axis={self.axis}, "
                f"block={self.block}, data={self.data.dtype}, scale={self.scale.dtype}{tuple(self.scale.shape)})")
