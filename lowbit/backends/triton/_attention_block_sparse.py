"""Triton block-sparse attention (flash-attention style), plus the pooled-attention kernel's entry point.

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
from ._support import check as _check_tensors


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
        offs_n = j * BS + tl.arange(0, BS)
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
        s = tl.where(valid, s, float("-inf"))
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
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptr = O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV))


def block_sparse_attention(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    _check_tensors(q, k, v)
    if q.dtype == torch.float64:
        raise TypeError("q: the triton backend computes in fp32 and does not take float64 (use backend='ref')")
    B, H, S, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    n = -(-S // block_size)
    counts, cols = block_lists(block_mask, causal)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, S, Dv, dtype=q.dtype, device=q.device)
    bd, bdv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    _block_sparse_fwd[(n, B * H)](
        q, k, v, out, counts, cols, float(scale), S, H, H // Hk, n,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        CAUSAL=causal, BS=block_size, BD=bd, BDV=bdv, D=D, DV=Dv, IEEE=q.dtype == torch.float32)
    return out
