"""SeerAttention's AttnGate: predicts, per head, how much each key block matters to each query block.

Q and K (before the model's rotary embedding) are pooled along the sequence in blocks of
`block_size` (the last partial block is pooled over the tokens it holds); the pooled features of
each kind ("avg", "max", "min") are concatenated along the feature dim and a per-head linear maps
them to `gate_dim`. Rotary embeddings at the block start positions (`position_ids[:, ::block_size]`,
as in the official code) put the relative block distance back into the scores, and the gate score
is softmax over key blocks of `q_blk . k_blk / sqrt(gate_dim)` under the causal block mask. With GQA
the key projection has one head per kv head, shared by that head's query group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import check_block_size, num_blocks

POOLS = ("avg", "max", "min")
# Finite stand-in for -inf above the block diagonal: exp() gives exactly 0, and a KL term
# 0 * (log 0 - log q) stays 0 instead of 0 * inf = NaN.
MASKED = -1e9


def _check_pools(pools, name: str) -> tuple[str, ...]:
    if isinstance(pools, str):
        pools = (pools,)
    pools = tuple(pools)
    if not pools or any(p not in POOLS for p in pools) or len(set(pools)) != len(pools):
        raise ValueError(f"{name}: expected a non-empty tuple of distinct pools from {POOLS}, got {pools!r}")
    return pools


def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: expected a positive int, got {x!r}")
    return x


def pool_blocks(x: torch.Tensor, block_size: int, kinds: tuple[str, ...]) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, n, D * len(kinds)]: per-block avg / max / min, concatenated in order."""
    B, H, S, D = x.shape
    n = num_blocks(S, block_size)
    pad = n * block_size - S
    feats = []
    for kind in kinds:
        if kind == "avg":
            counts = torch.full((n,), float(block_size), dtype=x.dtype, device=x.device)
            counts[-1] = S - (n - 1) * block_size
            s = F.pad(x, (0, 0, 0, pad)).view(B, H, n, block_size, D).sum(3)
            feats.append(s / counts[:, None])
        else:
            fill = float("-inf") if kind == "max" else float("inf")
            xb = F.pad(x, (0, 0, 0, pad), value=fill).view(B, H, n, block_size, D)
            feats.append(xb.amax(3) if kind == "max" else xb.amin(3))
    return torch.cat(feats, dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotate-half RoPE of x [B, H, n, d] at positions [B, n]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = positions.to(torch.float32)[:, None, :, None] * inv_freq
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), -1) * sin.to(x.dtype)


class MultiHeadLinear(nn.Module):
    """One [in, out] matrix per head: [B, H, n, in] -> [B, H, n, out]."""

    def __init__(self, heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features))
        nn.init.normal_(self.weight, std=in_features ** -0.5)  # unit-variance outputs for unit inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhni,hio->bhno", x, self.weight.to(x.dtype))


class AttnGate(nn.Module):
    """gate(q, k) -> block scores [B, Hq, n, n]: rows sum to 1, zero above the block diagonal."""

    def __init__(self, block_size: int, head_dim: int, gate_dim: int, num_q_heads: int, num_kv_heads: int,
                 q_pool=("avg",), k_pool=("max", "min", "avg"), rope_theta: float = 10000.0):
        super().__init__()
        self.block_size = check_block_size(block_size)
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.gate_dim = _positive_int(gate_dim, "gate_dim")
        if gate_dim % 2:
            raise ValueError(f"gate_dim: expected an even size (rotary embeddings rotate pairs), got {gate_dim}")
        self.num_q_heads = _positive_int(num_q_heads, "num_q_heads")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} kv heads must divide the {num_q_heads} query heads")
        self.q_pool = _check_pools(q_pool, "q_pool")
        self.k_pool = _check_pools(k_pool, "k_pool")
        if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"rope_theta: expected a positive number, got {rope_theta!r}")
        self.rope_theta = float(rope_theta)
        self.q_proj = MultiHeadLinear(num_q_heads, head_dim * len(self.q_pool), gate_dim)
        self.k_proj = MultiHeadLinear(num_kv_heads, head_dim * len(self.k_pool), gate_dim)

    def config(self) -> dict:
        return dict(block_size=self.block_size, head_dim=self.head_dim, gate_dim=self.gate_dim,
                    num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads, q_pool=list(self.q_pool),
                    k_pool=list(self.k_pool), rope_theta=self.rope_theta)

    def _check(self, q, k, position_ids):
        for x, name, heads in ((q, "q", self.num_q_heads), (k, "k", self.num_kv_heads)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point torch.Tensor")
            if x.dim() != 4 or x.shape[1] != heads or x.shape[3] != self.head_dim:
                raise ValueError(f"{name}: expected [batch, {heads}, seq, {self.head_dim}], got {tuple(x.shape)}")
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
            raise ValueError(f"k: expected batch and seq of q {tuple(q.shape[::2])}, got {tuple(k.shape[::2])}")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != q.shape[2]):
            raise ValueError(f"position_ids: expected [batch, {q.shape[2]}], got {tuple(position_ids.shape)}")

    def logits(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked gate logits [B, Hq, n, n] in fp32 (MASKED above the block diagonal)."""
        self._check(q, k, position_ids)
        B, _, S, _ = q.shape
        n = num_blocks(S, self.block_size)
        qg = self.q_proj(pool_blocks(q.float(), self.block_size, self.q_pool))
        kg = self.k_proj(pool_blocks(k.float(), self.block_size, self.k_pool))
        if position_ids is None:
            pos = torch.arange(0, S, self.block_size, device=q.device).expand(B, n)
        else:
            pos = position_ids[:, :: self.block_size]
        qg, kg = rotary(qg, pos, self.rope_theta), rotary(kg, pos, self.rope_theta)
        kg = kg.repeat_interleave(self.num_q_heads // self.num_kv_heads, dim=1)
        s = torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(self.gate_dim)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return s.masked_fill(~causal, MASKED)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(self.logits(q, k, position_ids), dim=-1)
