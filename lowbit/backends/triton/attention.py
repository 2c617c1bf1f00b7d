"""SeerAttention ops as Triton kernels (`_attention_block_pool`, `_attention_block_sparse`)."""
from __future__ import annotations


def attention_with_block_pool(q, k, v, block_size: int, causal: bool, scale: float):
    from . import _attention_block_pool  # lazy: Triton reads TRITON_INTERPRET at a kernel module's import

    return _attention_block_pool.attention_with_block_pool(q, k, v, block_size, causal, scale)


def block_sparse_attention(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    from . import _attention_block_sparse  # lazy, as above

    return _attention_block_sparse.block_sparse_attention(q, k, v, block_mask, block_size, causal, scale)
