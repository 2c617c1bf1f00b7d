"""Bad input raises a clear error that names the argument."""
import pytest
import torch

from lowbit.attention import AttnGate, attention_with_block_pool, block_sparse_attention, select
from lowbit.attention.gate import pool_blocks  # noqa: F401  (import check of the public helpers)


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("bs", [8, 24, 512, 0, 64.0, True])
def test_block_size(bs):
    with pytest.raises(ValueError, match="block_size"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 32, 16), t(1, 2, 32, 16), bs)
    with pytest.raises(ValueError, match="block_size"):
        AttnGate(bs, 16, 16, 2, 2)


def test_mask_shape_and_dtype():
    q = t(1, 2, 40, 16)
    with pytest.raises(ValueError, match=r"block_mask: expected shape \(1, 2, 3, 3\)"):
        block_sparse_attention(q, q, q, torch.ones(1, 2, 2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="block_mask: expected a bool"):
        block_sparse_attention(q, q, q, torch.ones(1, 2, 3, 3), 16)


def test_head_counts():
    with pytest.raises(ValueError, match="k: its 3 kv heads must divide the 4"):
        attention_with_block_pool(t(1, 4, 32, 16), t(1, 3, 32, 16), t(1, 3, 32, 16), 16)
    with pytest.raises(ValueError, match="v: expected 2 heads"):
        attention_with_block_pool(t(1, 4, 32, 16), t(1, 2, 32, 16), t(1, 1, 32, 16), 16)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttnGate(16, 16, 16, 4, 3)
    gate = AttnGate(16, 16, 16, 4, 2)
    with pytest.raises(ValueError, match="k: expected"):
        gate(t(1, 4, 32, 16), t(1, 4, 32, 16))


def test_dtypes():
    with pytest.raises(TypeError, match="q: expected float32"):
        attention_with_block_pool(torch.ones(1, 2, 32, 16, dtype=torch.int32), t(1, 2, 32, 16), t(1, 2, 32, 16), 16)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 32, 16, dtype=torch.bfloat16), t(1, 2, 32, 16), 16)


def test_shapes_and_scalars():
    with pytest.raises(ValueError, match="q: expected a 4-D"):
        attention_with_block_pool(t(2, 32, 16), t(2, 32, 16), t(2, 32, 16), 16)
    with pytest.raises(ValueError, match="k: expected batch 1 and seq 32"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 48, 16), t(1, 2, 48, 16), 16)
    with pytest.raises(ValueError, match="k: expected head_dim 16"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 32, 8), t(1, 2, 32, 16), 16)
    with pytest.raises(ValueError, match="scale"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 32, 16), t(1, 2, 32, 16), 16, scale=-1.0)
    with pytest.raises(TypeError, match="causal"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 32, 16), t(1, 2, 32, 16), 16, causal=1)
    with pytest.raises(ValueError, match="backend"):
        attention_with_block_pool(t(1, 2, 32, 16), t(1, 2, 32, 16), t(1, 2, 32, 16), 16, backend="nope")


def test_gate_arguments():
    with pytest.raises(ValueError, match="q_pool"):
        AttnGate(16, 16, 16, 2, 2, q_pool=("median",))
    with pytest.raises(ValueError, match="k_pool"):
        AttnGate(16, 16, 16, 2, 2, k_pool=())
    with pytest.raises(ValueError, match="gate_dim"):
        AttnGate(16, 16, 15, 2, 2)
    with pytest.raises(ValueError, match="head_dim"):
        AttnGate(16, 0, 16, 2, 2)


def test_selection_arguments():
    s = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="threshold"):
        select(s, threshold=1.5)
    with pytest.raises(ValueError, match="density"):
        select(s, density=0.0)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        select(s, topk=0)
    with pytest.raises(ValueError, match="exactly one"):
        select(s, threshold=0.1, density=0.5)
    with pytest.raises(ValueError, match="scores"):
        select(torch.rand(4, 4), density=0.5)
