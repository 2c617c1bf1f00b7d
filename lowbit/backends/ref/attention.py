"""Pure-PyTorch reference for the SeerAttention ops: the executable spec of `lowbit.attention.ops`.

Layout: q `[batch, q_heads, seq, head_dim]`, k and v `[batch, kv_heads, seq, head_dim]`; kv head `j`
serves query heads `j * g .. (j + 1) * g - 1` with `g = q_heads // kv_heads` (GQA, as in Llama).
The sequence is cut into `n = ceil(seq / block_size)` blocks; the last one may be partial.
Arithmetic is fp32 (fp64 for fp64 inputs); outputs are cast back to q's dtype.

attention_with_block_pool -> (out, pooled)
    out = softmax(q k^T * scale [+ causal mask]) v, exactly what SDPA computes.
    pooled[b, h, i, j] = max over the rows of query block i and the columns of key block j of the
    softmax probabilities, then each row i divided by its sum (the SeerAttention ground truth;
    zero above the block diagonal when causal). Computed one query block at a time, so memory is
    O(block_size * seq) per head, never the full attention matrix.

block_sparse_attention -> out
    Dense attention where key block j is visible to query block i only if block_mask[b, h, i, j]
    or i == j (the diagonal block is always computed), on top of the causal mask when causal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """[B, Hk, S, D] -> [B, Hq, S, D], each kv head repeated over its query-head group."""
    g = q_heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def num_blocks(seq: int, block_size: int) -> int:
    return -(-seq // block_size)


def _row_scores(q, k, r0: int, r1: int, causal: bool, scale: float, visible_cols=None) -> torch.Tensor:
    """Masked scores of query rows [r0, r1) against every key: [B, H, r1 - r0, S]."""
    S = k.shape[2]
    s = torch.matmul(q[:, :, r0:r1], k.transpose(-1, -2)) * scale
    allowed = torch.ones(r1 - r0, S, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        allowed = allowed & (torch.arange(S, device=q.device)[None, :] <= rows)
    allowed = allowed.expand(s.shape)
    if visible_cols is not None:  # [B, H, S] bool
        allowed = allowed & visible_cols[:, :, None, :]
    return s.masked_fill(~allowed, float("-inf"))


def attention_with_block_pool(q, k, v, block_size: int, causal: bool, scale: float):
    B, H, S, D = q.shape
    ct = compute_dtype(q)
    qf, kf, vf = q.to(ct), expand_kv(k, H).to(ct), expand_kv(v, H).to(ct)
    n = num_blocks(S, block_size)
    out = torch.empty(B, H, S, v.shape[-1], dtype=ct, device=q.device)
    pooled = torch.zeros(B, H, n, n, dtype=ct, device=q.device)
    pad = n * block_size - S
    for i in range(n):
        r0, r1 = i * block_size, min((i + 1) * block_size, S)
        p = torch.softmax(_row_scores(qf, kf, r0, r1, causal, scale), dim=-1)
        out[:, :, r0:r1] = torch.matmul(p, vf)
        # zero-padded columns never win a max of probabilities (all >= 0)
        blocks = F.pad(p, (0, pad)).view(B, H, r1 - r0, n, block_size)
        pooled[:, :, i] = blocks.amax(dim=(2, 4))
    pooled = pooled / pooled.sum(dim=-1, keepdim=True)
    return out.to(q.dtype), pooled.to(torch.float32 if ct == torch.float32 else ct)


def block_sparse_attention(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    B, H, S, D = q.shape
    ct = compute_dtype(q)
    qf, kf, vf = q.to(ct), expand_kv(k, H).to(ct), expand_kv(v, H).to(ct)
    n = num_blocks(S, block_size)
    out = torch.empty(B, H, S, v.shape[-1], dtype=ct, device=q.device)
    for i in range(n):
        r0, r1 = i * block_size, min((i + 1) * block_size, S)
        keep = block_mask[:, :, i].clone()
        keep[:, :, i] = True
        cols = keep.repeat_interleave(block_size, dim=-1)[:, :, :S]
        p = torch.softmax(_row_scores(qf, kf, r0, r1, causal, scale, cols), dim=-1)
        out[:, :, r0:r1] = torch.matmul(p, vf)
    return out.to(q.dtype)


def naive_attention_with_block_pool(q, k, v, block_size: int, causal: bool, scale: float | None = None):
    """The same outputs from the full [S, S] probability matrix (test oracle for short sequences)."""
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    ct = compute_dtype(q)
    qf, kf, vf = q.to(ct), expand_kv(k, H).to(ct), expand_kv(v, H).to(ct)
    s = qf @ kf.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = s.softmax(-1)
    n = num_blocks(S, block_size)
    pad = n * block_size - S
    pooled = F.max_pool2d(F.pad(p, (0, pad, 0, pad)), block_size)  # block max (p >= 0, so zero pads never win)
    pooled = pooled / pooled.sum(-1, keepdim=True)
    return (p @ vf).to(q.dtype), pooled


def expand_block_mask(block_mask: torch.Tensor, block_size: int, seq: int, causal: bool) -> torch.Tensor:
    """The token-level boolean mask [B, H, S, S] that block_sparse_attention applies (for tests and SDPA)."""
    n = block_mask.shape[-1]
    keep = block_mask | torch.eye(n, dtype=torch.bool, device=block_mask.device)
    m = keep.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :seq, :seq]
    if causal:
        m = m & torch.ones(seq, seq, dtype=torch.bool, device=m.device).tril()
    return m


def block_lists(block_mask: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [B*H*n] int32, cols [B*H*n, n] int32): each query block's visible key blocks, ascending
    (the selected ones, the diagonal, none above it when causal), padded with n."""
    n, dev = block_mask.shape[-1], block_mask.device
    keep = block_mask | torch.eye(n, dtype=torch.bool, device=dev)
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    keep = keep.reshape(-1, n)
    ar = torch.arange(n, dtype=torch.int32, device=dev)
    cols = torch.where(keep, ar, torch.full_like(ar, n)).sort(-1).values
    return keep.sum(-1, dtype=torch.int32).contiguous(), cols.to(torch.int32).contiguous()
