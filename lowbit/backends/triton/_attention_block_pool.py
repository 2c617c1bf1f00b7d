"""Triton attention_with_block_pool: exact attention plus the block-max-pooled probability map.

One program per (batch * head, BM query rows of a query block), two sweeps over the visible key
blocks, BN keys at a time: the first is flash attention (online max and sum, output accumulated in
fp32); the second recomputes the scores, turns them into final probabilities with the row max and
sum of the first sweep, and folds each key block's max probability into the map (an atomic max
where a query block spans several programs; probabilities are >= 0 and the map starts at 0). Rows
are normalised to sum to 1 on the host. The second sweep costs one more QK^T per tile (no P @ V),
in exchange for never storing per-row maxima. Tiles and grid: `_attention_common.launch_plan`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_common import attend_block, block_keys, key_scores, launch_args, query_tile


@triton.jit
def _pool_fwd(Q, K, V, O, P, scale, S, H, G, N_BLOCKS,
              sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
              CAUSAL: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
              BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    bh, i, b, h, offs_m, rows, q, kbase, vbase = query_tile(Q, S, H, G, N_BLOCKS, sqb, sqh, sqs, skb, skh, svb, svh,
                                                            BS, BM, BD, D)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < S
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    hi = N_BLOCKS
    if CAUSAL:
        hi = i + 1
    for j in range(0, hi):
        m_i, l_i, acc = attend_block(q, m_i, l_i, acc, K, V, kbase, vbase, j, offs_m, S, sks, svs, scale, CAUSAL,
                                     BS, BN, BD, BDV, D, DV, IEEE)
    tl.store(O + b * sob + h * soh + rows * sos + offs_dv[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    m_fin = tl.where(row_ok, m_i, 0.0)
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # rows past the end take no part in the max
    dst = P + (bh.to(tl.int64) * N_BLOCKS + i) * N_BLOCKS
    for j in range(0, hi):
        top = tl.zeros([BM], tl.float32)
        n0, end = block_keys(j, offs_m, BS, CAUSAL)
        for start in range(n0, end, BN):
            s, offs_n = key_scores(q, K, kbase, start, offs_m, S, sks, scale, CAUSAL, BN, BD, D, IEEE)
            top = tl.maximum(top, tl.max(tl.exp(s - m_fin[:, None]) * inv_l[:, None], 1))
        if BM == BS:
            tl.store(dst + j, tl.max(top, 0))
        else:
            tl.atomic_max(dst + j, tl.max(top, 0))


def attention_with_block_pool(q, k, v, block_size: int, causal: bool, scale: float):
    q, k, v, out, grid, sizes, strides, meta = launch_args(q, k, v, block_size)
    B, H, n = q.shape[0], q.shape[1], sizes[3]
    pooled = torch.zeros(B, H, n, n, dtype=torch.float32, device=q.device)
    _pool_fwd[grid](q, k, v, out, pooled, float(scale), *sizes, *strides, CAUSAL=causal, **meta)
    return out, pooled / pooled.sum(-1, keepdim=True)
