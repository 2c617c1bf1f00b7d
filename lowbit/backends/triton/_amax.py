"""Per-block amax of an [R, K] tensor as fp32 bit patterns (int32), with NaN for non-finite blocks.

For non-negative floats the order of the bit patterns is the order of the values, so the maximum
is an integer max (exact and independent of the reduction order); a block holding NaN or Inf
ends at or above 0x7F800000 and reads as NaN.

Two kernels: blocks whose sides are powers of two and hold at most TILE elements (MX, NVFP4,
1 x 128, 16 x 16) are reduced NR x NK blocks per program from one [NR*br, NK*bk] tile; other
blocks (tensor, row, large or odd tiles) are reduced in slabs of TR rows that loop over one block
column and fold each row's maximum into its block with an atomic max. Both grids are flat
(`launch_plan`), so no shape overflows a grid axis (`_limits`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import as_kernel_input, load_fp32

TILE = 4096
MAX_TR = 16
MAX_TK = 256


@triton.jit
def _amax_tiles_kernel(x_ptr, amax_ptr, R, K, nbr, nbk, n_blocks, BR: tl.constexpr, BK: tl.constexpr,
                       NR: tl.constexpr, NK: tl.constexpr, TOTAL: tl.constexpr, BF16: tl.constexpr):
    n_cols = tl.cdiv(nbk, NK)  # flat grid: axes 1 and 2 stop at 65535 programs
    pi = (tl.program_id(0) // n_cols).to(tl.int64)
    pj = (tl.program_id(0) % n_cols).to(tl.int64)
    rows = pi * (NR * BR) + tl.arange(0, NR * BR)
    cols = pj * (NK * BK) + tl.arange(0, NK * BK)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    v = load_fp32(x_ptr, rows[:, None] * K + cols[None, :], mask, BF16)
    a = tl.reshape(v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, (NR, BR, NK, BK))
    m = tl.max(tl.max(a, axis=3), axis=1)
    bi = pi * NR + tl.arange(0, NR)
    bj = pj * NK + tl.arange(0, NK)
    bmask = (bi < nbr)[:, None] & (bj < nbk)[None, :]
    tl.store(amax_ptr + bi[:, None] * nbk + bj[None, :], m, mask=bmask)
    if TOTAL:
        tl.atomic_max(amax_ptr + n_blocks, tl.max(tl.max(m, axis=1), axis=0))


@triton.jit
def _amax_slab_kernel(x_ptr, amax_ptr, R, K, br, bk, nbk, n_blocks, TR: tl.constexpr, TK: tl.constexpr,
                      TOTAL: tl.constexpr, BF16: tl.constexpr):
    rows = (tl.program_id(0) // nbk).to(tl.int64) * TR + tl.arange(0, TR)  # flat grid, as above
    bj = (tl.program_id(0) % nbk).to(tl.int64)
    rmask = rows < R
    acc = tl.zeros([TR, TK], dtype=tl.int32)
    for k0 in range(0, bk, TK):
        cols = k0 + tl.arange(0, TK)
        offs = rows[:, None] * K + (bj * bk + cols)[None, :]
        v = load_fp32(x_ptr, offs, rmask[:, None] & (cols < bk)[None, :], BF16)
        acc = tl.maximum(acc, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    m = tl.max(acc, axis=1)
    tl.atomic_max(amax_ptr + (rows // br) * nbk + bj, m, mask=rmask)
    if TOTAL:
        tl.atomic_max(amax_ptr + n_blocks, tl.max(m, axis=0))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def launch_plan(R: int, K: int, br: int, bk: int) -> tuple[bool, tuple[int], tuple[int, int]]:
    """(tiles kernel?, grid, (NR, NK) or (TR, TK)) for the blocks (br, bk) of an [R, K] tensor."""
    nbr, nbk = R // br, K // bk
    if _pow2(br) and _pow2(bk) and br * bk <= TILE:
        nk = max(1, min(TILE // (br * bk), triton.next_power_of_2(nbk), 128 // bk if bk < 128 else 1))
        nr = max(1, min(TILE // (br * bk * nk), triton.next_power_of_2(nbr)))
        return True, (triton.cdiv(nbr, nr) * triton.cdiv(nbk, nk),), (nr, nk)
    tr = min(triton.next_power_of_2(R), MAX_TR)
    tk = min(triton.next_power_of_2(bk), MAX_TK)
    return False, (triton.cdiv(R, tr) * nbk,), (tr, tk)


def smem_bytes() -> int:
    """Upper bound of either kernel's shared memory: at most a TILE of int32 through a layout change."""
    return max(TILE, MAX_TR * MAX_TK) * 4


def block_amax_bits(x: torch.Tensor, br: int, bk: int, total: bool) -> torch.Tensor:
    """int32 [R // br * K // bk (+ 1)]: amax bits per block, row-major; with `total`, the tensor's last."""
    R, K = x.shape
    nbr, nbk = R // br, K // bk
    n_blocks = nbr * nbk
    amax = torch.zeros(n_blocks + (1 if total else 0), dtype=torch.int32, device=x.device)
    if not x.numel():
        return amax
    x, bf16 = as_kernel_input(x)
    tiles, grid, (t0, t1) = launch_plan(R, K, br, bk)
    if tiles:
        _amax_tiles_kernel[grid](x, amax, R, K, nbr, nbk, n_blocks, br, bk, t0, t1, total, bf16)
    else:
        _amax_slab_kernel[grid](x, amax, R, K, br, bk, nbk, n_blocks, t0, t1, total, bf16)
    return amax
