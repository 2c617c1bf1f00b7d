"""Scale layouts the block-scaled GEMMs read (torch.nn.functional.scaled_mm / torch._scaled_mm).

lowbit keeps block scales row-major as [rows / br, K / bk] (`lowbit._ops.QParts.scale`); the GEMM
libraries want other layouts, built here. Each transform is exact (a copy, a padding or a repeat).

MX (1x32, E8M0) and NVFP4 (1x16, E4M3) scales: the cuBLAS / CUTLASS "128x4 block" layout
(https://docs.nvidia.com/cuda/cublas/#d-block-scaling-factors-layout; PyTorch's SwizzleType
SWIZZLE_32_4_4; torchao's `to_blocked`). The [rows, cols] scale matrix is zero-padded to
[128 * ceil(rows / 128), 4 * ceil(cols / 4)] and cut into 128 x 4 tiles, stored tile after tile,
row-of-tiles major; inside a tile, row r sits at (r % 32) * 16 + (r // 32) * 4. As one formula,
scale[r, c] lands at flat index

    ((r // 128) * ceil(cols / 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4

(one 512-byte tile holds the scales of 128 rows x 4 K-blocks, the unit a Blackwell MMA loads).

FP8 block scales (fp32; PyTorch's `_scaled_block*` checks, aten/src/ATen/native/cuda/ScaledBlas.cpp):
  BlockWise1x128 (one scale per row and 128 K): shape [R, ceil(K / 128)], outer-dim-major, i.e.
      strides (1, R) - the transpose of a contiguous [K / 128, R] tensor (`outer_major`);
  BlockWise128x128 (one scale per 128 x 128 tile): shape [L4, ceil(R / 128)] with strides (1, L4),
      L4 = 4 * ceil(K / 512) - the transpose of the row-major [R / 128, K / 128] scales whose K
      dim is zero-padded to a multiple of 4 fp32 (16 bytes, cuBLASLt's alignment) (`tiles_128x128`).
Both use the outer dimension (M for a, N for b) as given by the [rows, K] operand, so a's and b's
scales take the same transform.
"""
from __future__ import annotations

import torch

TILE_ROWS, TILE_COLS = 128, 4


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def swizzled_numel(rows: int, cols: int) -> int:
    """Elements of the swizzled layout of a [rows, cols] scale matrix (what scaled_mm checks)."""
    return _ceil(rows, TILE_ROWS) * TILE_ROWS * _ceil(cols, TILE_COLS) * TILE_COLS


def swizzle_index(rows: int, cols: int, device=None) -> torch.Tensor:
    """[rows, cols] int64: where each scale lands in the flat swizzled tensor (the docstring formula)."""
    r = torch.arange(rows, device=device).reshape(rows, 1)
    c = torch.arange(cols, device=device).reshape(1, cols)
    col_tiles = _ceil(cols, TILE_COLS)
    return (((r // TILE_ROWS) * col_tiles + c // TILE_COLS) * 512 + (r % 32) * 16
            + ((r % TILE_ROWS) // 32) * 4 + c % TILE_COLS)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # float8 types lack some ops (zeros, copies) on some torch builds; shuffle their bytes instead
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """[rows, cols] block scales -> flat SWIZZLE_32_4_4 tensor (same dtype, zero padding)."""
    if scales.dim() != 2:
        raise ValueError(f"scales: expected a [rows, cols] matrix, got shape {tuple(scales.shape)}")
    rows, cols = scales.shape
    rt, ct = _ceil(rows, TILE_ROWS), _ceil(cols, TILE_COLS)
    s = _as_bytes(scales)
    padded = s.new_zeros((rt * TILE_ROWS, ct * TILE_COLS))
    padded[:rows, :cols] = s
    # [rt, 128, ct, 4] -> tiles [rt, ct, 128, 4]; row r of a tile = 32 * i + j -> stored at (j, i)
    tiles = padded.reshape(rt, TILE_ROWS, ct, TILE_COLS).permute(0, 2, 1, 3)
    out = tiles.reshape(rt, ct, 4, 32, TILE_COLS).transpose(2, 3).reshape(-1)
    return out.view(scales.dtype) if out.dtype != scales.dtype else out


def unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `swizzle`: flat SWIZZLE_32_4_4 tensor -> [rows, cols] (padding dropped)."""
    rt, ct = _ceil(rows, TILE_ROWS), _ceil(cols, TILE_COLS)
    if flat.numel() != rt * ct * TILE_ROWS * TILE_COLS:
        raise ValueError(f"flat: expected {swizzled_numel(rows, cols)} elements for a [{rows}, {cols}] "
                         f"scale matrix, got {flat.numel()}")
    s = _as_bytes(flat.reshape(-1))
    tiles = s.reshape(rt, ct, 32, 4, TILE_COLS).transpose(2, 3).reshape(rt, ct, TILE_ROWS, TILE_COLS)
    out = tiles.permute(0, 2, 1, 3).reshape(rt * TILE_ROWS, ct * TILE_COLS)[:rows, :cols].contiguous()
    return out.view(flat.dtype) if out.dtype != flat.dtype else out


def expand_rows(scales: torch.Tensor, n: int) -> torch.Tensor:
    """Scales of n x bk tiles -> scales of 1 x bk blocks (each row repeated n times; exact).

    NVFP4 16x16 weight tiles become the 1x16 blocks the GEMM takes; FP8 128x128 tiles become 1x128.
    """
    return scales.repeat_interleave(n, dim=0) if n > 1 else scales


def outer_major(scales: torch.Tensor) -> torch.Tensor:
    """[R, nk] -> the same values with strides (1, R) (BlockWise1x128's outer-dim-major layout)."""
    return scales.t().contiguous().t()


def tiles_128x128(scales: torch.Tensor) -> torch.Tensor:
    """[R / 128, K / 128] fp32 -> [L4, R / 128] with strides (1, L4), L4 = K / 128 rounded up to 4."""
    nr, nk = scales.shape
    padded = scales.new_zeros((nr, _ceil(nk, 4) * 4))
    padded[:, :nk] = scales
    return padded.t()


__all__ = ["swizzle", "unswizzle", "swizzle_index", "swizzled_numel", "expand_rows", "outer_major",
           "tiles_128x128"]
