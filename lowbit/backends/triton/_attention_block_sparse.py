"""Triton block-sparse attention (flash-attention style).

One program per (batch * head, BM query rows of a query block). The selected key blocks of each
query block are passed as a sorted index list (CSR: `counts[row]`, `cols[row, :counts[row]]`), so
a program loops only over its selected blocks, BN keys at a time; the diagonal block is always in
the list. Softmax is online (running max and sum, rescaled per key tile) in fp32. fp32 inputs use
IEEE fp32 dots so results match the reference to fp32 rounding; fp16/bf16 inputs use the tensor
cores with fp32 accumulation. Tiles and grid: `_attention_common.launch_plan`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..ref.attention import block_lists
from ._attention_common import attend_block, launch_args, query_tile


@triton.jit
def _block_sparse_fwd(Q, K, V, O, counts, cols, scale, S, H, G, N_BLOCKS,
                      sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                      CAUSAL: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    bh, i, b, h, offs_m, rows, q, kbase, vbase = query_tile(Q, S, H, G, N_BLOCKS, sqb, sqh, sqs, skb, skh, svb, svh,
                                                            BS, BM, BD, D)
    offs_dv = tl.arange(0, BDV)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    row = bh.to(tl.int64) * N_BLOCKS + i
    cnt = tl.load(counts + row)
    for c in range(0, cnt):
        j = tl.load(cols + row * N_BLOCKS + c)
        m_i, l_i, acc = attend_block(q, m_i, l_i, acc, K, V, kbase, vbase, j, offs_m, S, sks, svs, scale, CAUSAL,
                                     BS, BN, BD, BDV, D, DV, IEEE)
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows * sos + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV))


def block_sparse_attention(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    q, k, v, out, grid, sizes, strides, meta = launch_args(q, k, v, block_size)
    counts, cols = block_lists(block_mask, causal)
    _block_sparse_fwd[grid](q, k, v, out, counts, cols, float(scale), *sizes, *strides, CAUSAL=causal, **meta)
    return out
