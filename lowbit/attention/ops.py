"""Public SeerAttention ops: `attention_with_block_pool` and `block_sparse_attention`.

This layer checks arguments (bad input is a ValueError/TypeError naming the argument) and calls the
`lowbit::*` custom ops, which pick a backend when they run (so `torch.compile` traces them). The
numerics are defined by `lowbit.backends.ref.attention`; the backend registry
(`lowbit.backends`) picks the implementation:
  ref     pure PyTorch (any device)
  cpu     block_sparse_attention only: gathers only the selected K/V blocks, so its work scales
          with the block density
  triton  one Triton kernel per op (CUDA, or CPU under TRITON_INTERPRET=1)
`lowbit.backends.use_backend(name)` and the `backend=` argument choose one explicitly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BLOCK_MIN, BLOCK_MAX = 16, 256


@torch.library.custom_op("lowbit::attention_with_block_pool", mutates_args=())
def _attention_with_block_pool(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool, scale: float,
                               backend: str) -> tuple[Tensor, Tensor]:
    return backends.for_op("attention_with_block_pool", q.device.type, backend)(q, k, v, block_size, causal, scale)


@_attention_with_block_pool.register_fake
def _(q, k, v, block_size, causal, scale, backend):
    B, H, S, _ = q.shape
    n = -(-S // block_size)
    pooled_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, H, S, v.shape[-1]), q.new_empty(B, H, n, n, dtype=pooled_dtype)


@torch.library.custom_op("lowbit::block_sparse_attention", mutates_args=())
def _block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, block_size: int, causal: bool,
                            scale: float, backend: str) -> Tensor:
    return backends.for_op("block_sparse_attention", q.device.type, backend)(q, k, v, block_mask, block_size, causal, scale)


@_block_sparse_attention.register_fake
def _(q, k, v, block_mask, block_size, causal, scale, backend):
    B, H, S, _ = q.shape
    return q.new_empty(B, H, S, v.shape[-1])


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not BLOCK_MIN <= block_size <= BLOCK_MAX \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two in [{BLOCK_MIN}, {BLOCK_MAX}], got {block_size!r}")
    return block_size


def _check_tensor(x, name: str, dims: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_INPUTS:
        raise TypeError(f"{name}: expected float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")


def check_qkv(q, k, v) -> None:
    """Shapes, dtypes and devices of q [B, Hq, S, D], k [B, Hk, S, D], v [B, Hk, S, Dv]."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(x, name)
    for x, name in ((k, "k"), (v, "v")):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {x.device}")
        if x.shape[0] != q.shape[0] or x.shape[2] != q.shape[2]:
            raise ValueError(f"{name}: expected batch {q.shape[0]} and seq {q.shape[2]} like q, got shape {tuple(x.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head_dim {q.shape[-1]} like q, got {k.shape[-1]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v: expected {k.shape[1]} heads like k, got {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k: its {k.shape[1]} kv heads must divide the {q.shape[1]} query heads of q (GQA)")
    if q.shape[2] == 0:
        raise ValueError("q: expected a non-empty sequence")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected None or a positive finite float, got {scale!r}")
    return float(scale)


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    return causal


def num_blocks(seq: int, block_size: int) -> int:
    return -(-seq // block_size)


def check_block_mask(block_mask, q: Tensor, block_size: int) -> None:
    B, H, S, _ = q.shape
    n = num_blocks(S, block_size)
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask: expected a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask: expected a bool tensor, got {block_mask.dtype}")
    if tuple(block_mask.shape) != (B, H, n, n):
        raise ValueError(f"block_mask: expected shape {(B, H, n, n)} ([batch, q_heads, blocks, blocks] for seq {S} "
                         f"in blocks of {block_size}), got {tuple(block_mask.shape)}")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask: expected the device of q ({q.device}), got {block_mask.device}")


def attention_with_block_pool(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool = True,
                              scale: Optional[float] = None, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Exact attention (as SDPA) plus the block-pooled attention map that a SeerAttention gate learns.

    q [B, Hq, S, D], k/v [B, Hk, S, D] (Hk divides Hq). Returns out [B, Hq, S, Dv] in q's dtype and
    pooled [B, Hq, n, n] fp32 (fp64 for fp64 inputs), n = ceil(S / block_size): the max softmax
    probability in each (query block, key block), rows normalised to sum to 1.
    """
    check_qkv(q, k, v)
    block_size = check_block_size(block_size)
    causal = _check_causal(causal)
    scale = _check_scale(scale, q.shape[-1])
    return _attention_with_block_pool(q.contiguous(), k.contiguous(), v.contiguous(), block_size, causal, scale,
                                      backends.requested(backend))


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, block_size: int, causal: bool = True,
                           scale: Optional[float] = None, *, backend: Optional[str] = None) -> Tensor:
    """Attention over the key blocks selected by block_mask [B, Hq, n, n] (bool; the diagonal is always on).

    Equals SDPA with the unselected blocks masked out; with an all-true mask it equals SDPA.
    """
    check_qkv(q, k, v)
    block_size = check_block_size(block_size)
    check_block_mask(block_mask, q, block_size)
    causal = _check_causal(causal)
    scale = _check_scale(scale, q.shape[-1])
    return _block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask.contiguous(),
                                   block_size, causal, scale, backends.requested(backend))
