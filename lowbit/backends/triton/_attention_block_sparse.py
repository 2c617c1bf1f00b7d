"""Triton block-sparse attention (flash-attention style).

One program per (query block, batch * head). The selected key blocks of each query block are passed
as a sorted index list (CSR: `counts[row]`, `cols[row, :counts[row]]`), so a program loops only over
its selected blocks; the diagonal block is always in the list. Softmax is online (running max and
sum, rescaled per block) in fp32. fp32 inputs use IEEE fp32 dots so results match the reference to
fp32 rounding; fp16/bf16 inputs use the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ref.attention import block_lists
from ._attention_common import block_scores, launch_args, online_softmax_step


@triton.jit
def _block_sparse_fwd(Q, K, V, O, counts, cols, scale, S, H, G, N_BLOCKS,
                      sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                      CAUSAL: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    offs_m = i * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_ptr = Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptr, mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, BDV], tl.float32)
    row = bh * N_BLOCKS + i
    cnt = tl.load(counts + row)
    for t in range(0, cnt):
        j = tl.load(cols + row * N_BLOCKS + t)
        s, offs_n = block_scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale, CAUSAL, BS, BD, D, IEEE)
        m_i, l_i, acc = online_softmax_step(s, offs_n, m_i, l_i, acc, V, b, kvh, S, svb, svh, svs, BDV, DV, IEEE)
    out = acc / l_i[:, None]
    o_ptr = O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV))


def block_sparse_attention(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    q, k, v, out, sizes, strides, meta = launch_args(q, k, v, block_size)
    n = sizes[3]
    counts, cols = block_lists(block_mask, causal)
    _block_sparse_fwd[(n, q.shape[0] * q.shape[1])](q, k, v, out, counts, cols, float(scale), *sizes, *strides,
                                                    CAUSAL=causal, **meta)
    return out
