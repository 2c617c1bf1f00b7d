"""Pieces both Triton attention kernels share: the masked scores of one key tile, one online-softmax
step (flash attention), one key block folded in tile by tile, and the host-side launch plan.

A program takes BM query rows of one (batch, head) and walks a key block of BS keys BN at a time,
so the block size sets the sparsity pattern but not the tiles: BM, BN and the pipeline depth are
picked (`tiles`) so that the K / V tiles of every stage plus the Q and P dot operands fit the
shared memory of the GPU (`_limits`). The grid is one flat axis of (batch * head, query tile),
the tiles of one head adjacent so that they share its keys in L2; offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._limits import smem_limit
from ._support import check

# (BM, BN, pipeline stages), most preferred first: the first whose estimate fits is used.
TILE_CHOICES = ((64, 64, 3), (64, 64, 2), (64, 32, 2), (32, 32, 2), (32, 16, 2), (16, 16, 2), (16, 16, 1))


@triton.jit
def query_tile(Q, S, H, G, N_BLOCKS, sqb, sqh, sqs, skb, skh, svb, svh, BS: tl.constexpr, BM: tl.constexpr,
               BD: tl.constexpr, D: tl.constexpr):
    """This program's (batch * head, query tile) from the flat grid: bh, its query block i, b, h, the rows
    offs_m (and as int64 column `rows`), the loaded Q tile, and the K / V base offsets of its KV head."""
    q_tiles = N_BLOCKS * (BS // BM)
    bh = tl.program_id(0) // q_tiles
    t = tl.program_id(0) % q_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kvh = h // G
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sqs + offs_d[None, :],
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    return bh, t // (BS // BM), b, h, offs_m, rows, q, b * skb + kvh * skh, b * svb + kvh * svh


@triton.jit
def key_scores(q, K, kbase, n0, offs_m, S, sks, scale, CAUSAL: tl.constexpr, BN: tl.constexpr,
               BD: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """Scores of the query rows `offs_m` against keys n0 .. n0 + BN, -inf where masked; and the key offsets."""
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    k = tl.load(K + kbase + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :],
                mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    valid = offs_n[None, :] < S
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf")), offs_n


@triton.jit
def online_softmax_step(s, offs_n, m_i, l_i, acc, V, vbase, S, svs, BDV: tl.constexpr, DV: tl.constexpr,
                        IEEE: tl.constexpr):
    """Fold one tile of scores into the running (max, sum, output) of flash attention."""
    offs_dv = tl.arange(0, BDV)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + vbase + offs_n.to(tl.int64)[:, None] * svs + offs_dv[None, :],
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def block_keys(j, offs_m, BS: tl.constexpr, CAUSAL: tl.constexpr):
    """(first key, end of the keys to visit) of key block j: causally, none past the program's last row."""
    n0 = j * BS
    end = n0 + BS
    if CAUSAL:
        end = tl.minimum(end, tl.max(offs_m, 0) + 1)  # tiles wholly above the diagonal only add zeros
    return n0, end


@triton.jit
def attend_block(q, m_i, l_i, acc, K, V, kbase, vbase, j, offs_m, S, sks, svs, scale, CAUSAL: tl.constexpr,
                 BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 D: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """Fold key block j, BN keys at a time, into the running (max, sum, output)."""
    n0, end = block_keys(j, offs_m, BS, CAUSAL)
    for start in range(n0, end, BN):
        s, offs_n = key_scores(q, K, kbase, start, offs_m, S, sks, scale, CAUSAL, BN, BD, D, IEEE)
        m_i, l_i, acc = online_softmax_step(s, offs_n, m_i, l_i, acc, V, vbase, S, svs, BDV, DV, IEEE)
    return m_i, l_i, acc


def smem_bytes(bm: int, bn: int, bd: int, bdv: int, esize: int, stages: int) -> int:
    """Estimate of a program's shared memory: the K and V tiles of every pipeline stage, and the Q and P
    tiles as dot operands (Triton stages dot operands through shared memory)."""
    return (stages * bn * (bd + bdv) + bm * (bd + bn)) * esize


def tiles(block_size: int, d: int, dv: int, esize: int, smem: int) -> tuple[int, int, int]:
    """(BM, BN, stages): the first of TILE_CHOICES whose estimate fits `smem` bytes."""
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    for bm, bn, stages in TILE_CHOICES:
        bm, bn = min(bm, block_size), min(bn, block_size)
        if smem_bytes(bm, bn, bd, bdv, esize, stages) <= smem:
            return bm, bn, stages
    raise ValueError(f"triton attention: head_dim {d} / {dv} in {esize}-byte elements does not fit the {smem} bytes "
                     "of shared memory of this GPU (use backend='ref')")


def launch_plan(B: int, H: int, S: int, d: int, dv: int, block_size: int, esize: int,
                smem: int) -> tuple[tuple[int], dict]:
    """(grid, kernel meta-parameters) for q [B, H, S, d] and v [., ., S, dv]."""
    bm, bn, stages = tiles(block_size, d, dv, esize, smem)
    n = triton.cdiv(S, block_size)
    meta = dict(BS=block_size, BM=bm, BN=bn, BD=max(16, triton.next_power_of_2(d)),
                BDV=max(16, triton.next_power_of_2(dv)), D=d, DV=dv, IEEE=esize == 4, num_stages=stages)
    return (B * H * n * (block_size // bm),), meta


def launch_args(q, k, v, block_size: int):
    """Checked contiguous q, k, v, the output tensor, the grid, and the arguments both kernels take
    after their own."""
    check(q, k, v)
    if q.dtype == torch.float64:
        raise TypeError("q: the triton backend computes in fp32 and does not take float64 (use backend='ref')")
    B, H, S, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, S, Dv, dtype=q.dtype, device=q.device)
    grid, meta = launch_plan(B, H, S, D, Dv, block_size, q.element_size(), smem_limit(q.device))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    return q, k, v, out, grid, (S, H, H // Hk, triton.cdiv(S, block_size)), strides, meta
