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

from ._support import check as _check_tensors


@triton.jit
def _scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale,
            CAUSAL: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    offs_n = j * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BD)
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :],
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
        s, offs_n = _scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale, CAUSAL, BS, BD, D, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    m_fin = tl.where(row_ok, m_i, 0.0)
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # rows past the end take no part in the max
    for j in range(0, hi):
        s, offs_n = _scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale, CAUSAL, BS, BD, D, IEEE)
        p = tl.exp(s - m_fin[:, None]) * inv_l[:, None]
        tl.store(P + (bh * N_BLOCKS + i) * N_BLOCKS + j, tl.max(tl.max(p, 1), 0))


def attention_with_block_pool(q, k, v, block_size: int, causal: bool, scale: float):
    _check_tensors(q, k, v)
    if q.dtype == torch.float64:
        raise TypeError("q: the triton backend computes in fp32 and does not take float64 (use backend='ref')")
    B, H, S, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    n = -(-S // block_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, S, Dv, dtype=q.dtype, device=q.device)
    pooled = torch.zeros(B, H, n, n, dtype=torch.float32, device=q.device)
    bd, bdv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    _pool_fwd[(n, B * H)](
        q, k, v, out, pooled, float(scale), S, H, H // Hk, n,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        CAUSAL=causal, BS=block_size, BD=bd, BDV=bdv, D=D, DV=Dv, IEEE=q.dtype == torch.float32)
    return out, pooled / pooled.sum(-1, keepdim=True)
