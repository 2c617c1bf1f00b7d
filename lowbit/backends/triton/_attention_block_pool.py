"""Triton attention_with_block_pool: exact attention plus the block-max-pooled probability map.

One program per (query block, batch * head), two sweeps over the visible key blocks: the first is
flash attention (online max and sum, output accumulated in fp32); the second recomputes each
block's scores, turns them into final probabilities with the row max and sum of the first sweep,
and stores the block's max probability. Rows are normalised to sum to 1 on the host. The second
sweep costs one more QK^T per block (no P @ V), in exchange for never storing per-row maxima.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_common import block_scores, launch_args, online_softmax_step


@triton.jit
def _pool_fwd(Q, K, V, O, P, scale, S, H, G, N_BLOCKS,
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
    row_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, BDV], tl.float32)
    hi = i + 1 if CAUSAL else N_BLOCKS
    for j in range(0, hi):
        s, offs_n = block_scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale, CAUSAL, BS, BD, D, IEEE)
        m_i, l_i, acc = online_softmax_step(s, offs_n, m_i, l_i, acc, V, b, kvh, S, svb, svh, svs, BDV, DV, IEEE)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    m_fin = tl.where(row_ok, m_i, 0.0)
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # rows past the end take no part in the max
    for j in range(0, hi):
        s, offs_n = block_scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale, CAUSAL, BS, BD, D, IEEE)
        p = tl.exp(s - m_fin[:, None]) * inv_l[:, None]
        tl.store(P + (bh * N_BLOCKS + i) * N_BLOCKS + j, tl.max(tl.max(p, 1), 0))


def attention_with_block_pool(q, k, v, block_size: int, causal: bool, scale: float):
    q, k, v, out, sizes, strides, meta = launch_args(q, k, v, block_size)
    B, H, n = q.shape[0], q.shape[1], sizes[3]
    pooled = torch.zeros(B, H, n, n, dtype=torch.float32, device=q.device)
    _pool_fwd[(n, B * H)](q, k, v, out, pooled, float(scale), *sizes, *strides, CAUSAL=causal, **meta)
    return out, pooled / pooled.sum(-1, keepdim=True)
