"""Pieces both Triton attention kernels share: the masked scores of one key block, one online-softmax
step (flash attention), and the host-side launch arguments."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._support import check


@triton.jit
def block_scores(q, K, b, kvh, j, offs_m, S, skb, skh, sks, scale,
                 CAUSAL: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """Scores of the query rows `offs_m` against key block j, -inf where masked; and the key offsets."""
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
def online_softmax_step(s, offs_n, m_i, l_i, acc, V, b, kvh, S, svb, svh, svs,
                        BDV: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """Fold one block of scores into the running (max, sum, output) of flash attention."""
    offs_dv = tl.arange(0, BDV)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_dv[None, :],
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


def launch_args(q, k, v, block_size: int):
    """Checked contiguous q, k, v, the output tensor, and the arguments both kernels take after their own."""
    check(q, k, v)
    if q.dtype == torch.float64:
        raise TypeError("q: the triton backend computes in fp32 and does not take float64 (use backend='ref')")
    B, H, S, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    n = -(-S // block_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, S, Dv, dtype=q.dtype, device=q.device)
    bd, bdv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    meta = dict(BS=block_size, BD=bd, BDV=bdv, D=D, DV=Dv, IEEE=q.dtype == torch.float32)
    return q, k, v, out, (S, H, H // Hk, n), strides, meta
