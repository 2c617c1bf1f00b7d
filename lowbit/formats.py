"""Format descriptors: data only. The arithmetic that uses them lives in the `lowbit.backends.ref` package."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Element:
    """A small floating-point element type: sign, `ebits` exponent bits, `mbits` mantissa bits."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite value
    has_inf: bool
    torch_dtype: torch.dtype | None  # storage dtype torch defines for it, if any
    signed: bool = True  # whether it has a sign bit (uint4 has none)

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (OCP MX's emax_elem)."""
        return int(math.floor(math.log2(self.max)))

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits


E4M3 = Element("e4m3", 4, 3, 7, 448.0, False, torch.float8_e4m3fn)
E5M2 = Element("e5m2", 5, 2, 15, 57344.0, True, torch.float8_e5m2)
E2M1 = Element("e2m1", 2, 1, 1, 6.0, False, None)
BF16 = Element("bf16", 8, 7, 127, float(torch.finfo(torch.bfloat16).max), True, torch.bfloat16)
FP16 = Element("fp16", 5, 10, 15, 65504.0, True, torch.float16)
# Integers are elements without exponent bits. int4 codes are two's complement nibbles in [-8, 7]
# (`max` is the 7 a symmetric scale maps to); uint4 codes are [0, 15].
INT4 = Element("int4", 0, 3, 0, 7.0, False, None)
UINT4 = Element("uint4", 0, 4, 0, 15.0, False, None, signed=False)

ELEMENT_OF_DTYPE = {
    torch.float8_e4m3fn: E4M3,
    torch.float8_e5m2: E5M2,
    torch.bfloat16: BF16,
    torch.float16: FP16,
}


@dataclass(frozen=True)
class Format:
    """A quantized tensor format.

    kind: "fp8" (fp32 scales: tensor, row, 1x128 or 128x128 blocks), "mx" (OCP MX: E8M0 scale per
    1x32 block), "nvfp4" (E4M3 scale per 1x16 or 16x16 block and an fp32 per-tensor scale),
    "int4" (Stable-SPAM's integer formats: an fp32 record per 1 x g group, see `scale_fields`).
    `block` is the default block: None = one scale per tensor.
    """

    name: str
    kind: str
    elem: Element
    block: tuple[int, int] | None
    scale_dtype: torch.dtype

    @property
    def max(self) -> float:
        return self.elem.max

    @property
    def packed(self) -> bool:
        """Two 4-bit codes per uint8 byte (element 2i low nibble, 2i+1 high nibble)."""
        return self.elem.bits == 4

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.uint8 if self.packed else self.elem.torch_dtype

    @property
    def scale_fields(self) -> int:
        """0: the scale is one number per block. INT4: each group's scale is a record of this many fp32
        fields, a trailing dim of the scale tensor (int4_weight (s, zero); int4_act (s, v0, v1, i0, i1))."""
        if self.kind != "int4":
            return 0
        return 2 if self.elem is UINT4 else 1 + 2 * INT4_TOPK

    def __str__(self) -> str:
        return self.name


FP8_E4M3 = Format("fp8_e4m3", "fp8", E4M3, None, torch.float32)
FP8_E5M2 = Format("fp8_e5m2", "fp8", E5M2, None, torch.float32)
MXFP8 = Format("mxfp8", "mx", E4M3, (1, 32), torch.uint8)
MXFP8_E5M2 = Format("mxfp8_e5m2", "mx", E5M2, (1, 32), torch.uint8)
MXFP4 = Format("mxfp4", "mx", E2M1, (1, 32), torch.uint8)
NVFP4 = Format("nvfp4", "nvfp4", E2M1, (1, 16), torch.float8_e4m3fn)
# Stable-SPAM's INT4 (groups of 256 along the reduction dim by default): weights asymmetric with a
# zero point, activations symmetric with the INT4_TOPK largest |x| of each group kept exactly.
INT4_TOPK = 2
INT4_WEIGHT = Format("int4_weight", "int4", UINT4, (1, 256), torch.float32)
INT4_ACT = Format("int4_act", "int4", INT4, (1, 256), torch.float32)

FORMATS = {f.name: f for f in (FP8_E4M3, FP8_E5M2, MXFP8, MXFP8_E5M2, MXFP4, NVFP4, INT4_WEIGHT, INT4_ACT)}


def get_format(fmt) -> Format:
    """Accept a Format or its name (case-insensitive)."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in FORMATS:
        return FORMATS[fmt.lower()]
    raise ValueError(f"fmt: unknown format {fmt!r}; expected a lowbit.formats descriptor or one of {sorted(FORMATS)}")
