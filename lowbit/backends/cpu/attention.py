"""CPU block-sparse attention whose work scales with the number of selected blocks.

With the C++ extension built (csrc/cpu/attention.cpp), fp32/bf16/fp16 inputs run its kernel: each
query block reads its selected K/V blocks in place (no gathered copies), one parallel region for the
whole op. Otherwise (and for fp64) the PyTorch path below runs:
For every query block the selected key blocks are listed (ascending); query blocks that selected the
same number c of key blocks are batched: their K and V blocks are gathered into [rows, c * bs, D],
scored with one batched matmul, soft-maxed in one pass and multiplied by V with a second one. Work
and memory traffic are proportional to the number of selected blocks; chunks of at most
PAIRS_PER_CHUNK gathered blocks keep the working set cache-sized. Same signature and results (to
fp32 rounding) as `lowbit.backends.ref.attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ref.attention import block_lists
from ._native import _C

# pairs per chunk: 256 pairs of 64x128 fp32 K and V blocks are ~16 MB gathered
PAIRS_PER_CHUNK = 256


def unavailable() -> str | None:
    """None: without the C++ extension the PyTorch path below serves."""
    return None


def _padded_blocks(x: torch.Tensor, n: int, block_size: int, ct: torch.dtype) -> torch.Tensor:
    """[B, H, S, D] -> [B * H * n, block_size, D] (zero-padded to whole blocks)."""
    B, H, S, D = x.shape
    x = x.to(ct)
    if n * block_size != S:
        x = F.pad(x, (0, 0, 0, n * block_size - S))
    return x.reshape(B * H * n, block_size, D)


def _native():
    """The C++ kernel, or None where the extension is not built (the PyTorch path serves)."""
    return getattr(_C, "block_sparse_attention_f32", None)


def block_sparse_attention(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    kernel = _native()
    if kernel is not None and q.dtype != torch.float64:
        B, Hk, S, D = k.shape
        n = -(-S // block_size)
        kt = F.pad(k.float(), (0, 0, 0, n * block_size - S)).view(B, Hk, n, block_size, D).transpose(-1, -2)
        counts, cols = block_lists(block_mask, causal)
        out = kernel(q.float().contiguous(), kt.contiguous(), v.float().contiguous(), counts, cols, block_size,
                     causal, scale)
        return out.to(q.dtype)
    return blocks_in_torch(q, k, v, block_mask, block_size, causal, scale)


def blocks_in_torch(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    B, H, S, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    g = H // Hk
    n = -(-S // block_size)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb = _padded_blocks(q, n, block_size, ct)
    kb = _padded_blocks(k, n, block_size, ct)
    vb = _padded_blocks(v, n, block_size, ct)

    keep = block_mask | torch.eye(n, dtype=torch.bool)
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
    keep = keep.reshape(B * H * n, n)
    # (row, key block) pairs in row-major order, row = (b * H + h) * n + i; key blocks ascend in a row
    pairs = keep.nonzero()
    rows, cols = pairs[:, 0], pairs[:, 1]
    bh = rows // n
    kv_rows = ((bh // H) * Hk + (bh % H) // g) * n + cols
    counts = keep.sum(-1)
    starts = torch.cumsum(counts, 0) - counts

    idx = torch.arange(block_size)
    upper = idx[None, :] > idx[:, None]  # key after query inside the diagonal block
    pad_cols = idx >= S - (n - 1) * block_size  # columns past the end of the last key block
    ragged = n * block_size != S
    out = torch.empty(B * H * n, block_size, Dv, dtype=ct)

    # rows with the same number of selected blocks form one dense batch: no scatter, one softmax
    for c in torch.unique(counts).tolist():
        group = (counts == c).nonzero().squeeze(1)
        step = max(1, PAIRS_PER_CHUNK // c)
        for g0 in range(0, len(group), step):
            r = group[g0:g0 + step]
            pidx = starts[r][:, None] + torch.arange(c)  # [R, c] pair ids
            kv = kv_rows.index_select(0, pidx.reshape(-1))
            # index_select copies whole blocks (advanced indexing is ~20x slower on CPU)
            kk = kb.index_select(0, kv).view(len(r), c * block_size, D)
            s = torch.bmm(qb.index_select(0, r), kk.transpose(1, 2)).mul_(scale)  # [R, bs, c * bs]
            last = s[:, :, (c - 1) * block_size:]
            if causal:  # causal: the diagonal block is the last one of every row
                last.masked_fill_(upper, float("-inf"))
            elif ragged:
                tail = (cols[pidx[:, -1]] == n - 1).nonzero().squeeze(1)
                last[tail] = last[tail].masked_fill(pad_cols, float("-inf"))
            p = torch.softmax(s, dim=-1)
            vv = vb.index_select(0, kv).view(len(r), c * block_size, Dv)
            out.index_copy_(0, r, torch.bmm(p, vv))
    return out.view(B, H, n * block_size, Dv)[:, :, :S].to(q.dtype).contiguous()
