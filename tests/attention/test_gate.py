"""AttnGate: pooling, shapes with GQA, score rows, rotary at block positions."""
import math

import pytest
import torch

from lowbit.attention import AttnGate
from lowbit.attention.gate import pool_blocks, rotary


def test_pooling_with_a_partial_last_block():
    x = torch.randn(1, 1, 37, 4, generator=torch.Generator().manual_seed(0))
    got = pool_blocks(x, 16, ("avg", "max", "min"))
    assert got.shape == (1, 1, 3, 12)
    for i, (a, b) in enumerate(((0, 16), (16, 32), (32, 37))):
        blk = x[0, 0, a:b]
        want = torch.cat([blk.mean(0), blk.amax(0), blk.amin(0)])
        torch.testing.assert_close(got[0, 0, i], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("q_heads,kv_heads,seq", [(8, 2, 100), (4, 4, 64), (4, 1, 16)])
def test_scores_shape_rows_and_mask(q_heads, kv_heads, seq):
    torch.manual_seed(1)
    gate = AttnGate(16, 32, 24, q_heads, kv_heads)
    q, k = torch.randn(2, q_heads, seq, 32), torch.randn(2, kv_heads, seq, 32)
    s = gate(q, k)
    n = math.ceil(seq / 16)
    assert s.shape == (2, q_heads, n, n)
    torch.testing.assert_close(s.sum(-1), torch.ones(2, q_heads, n), atol=1e-6, rtol=0)
    lower = torch.ones(n, n, dtype=torch.bool).tril()
    assert (s[..., ~lower] == 0).all() and (s[..., lower] > 0).all()
    assert gate.q_proj.weight.shape == (q_heads, 32, 24)        # avg only
    assert gate.k_proj.weight.shape == (kv_heads, 3 * 32, 24)   # max, min, avg; one per kv head


def test_gqa_key_heads_are_shared_by_their_group():
    torch.manual_seed(2)
    gate = AttnGate(16, 16, 16, 4, 2)
    with torch.no_grad():
        gate.q_proj.weight[1] = gate.q_proj.weight[0]  # heads 0 and 1 form kv group 0
    q = torch.randn(1, 1, 64, 16).expand(1, 4, 64, 16).contiguous()
    s = gate(q, torch.randn(1, 2, 64, 16))
    torch.testing.assert_close(s[:, 0], s[:, 1], atol=0, rtol=0)
    assert not torch.allclose(s[:, 0], s[:, 2])


def test_rotary_at_block_positions_gives_relative_scores():
    # shifting every position by whole blocks leaves q.k between rotated vectors unchanged
    torch.manual_seed(3)
    x = torch.randn(1, 2, 4, 8)
    pos = torch.arange(0, 64, 16)[None]
    a, b = rotary(x, pos, 1e4), rotary(x, pos + 160, 1e4)
    torch.testing.assert_close(a @ a.transpose(-1, -2), b @ b.transpose(-1, -2), atol=1e-4, rtol=0)
    gate = AttnGate(16, 16, 16, 2, 2)
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    torch.testing.assert_close(gate(q, k), gate(q, k, torch.arange(320, 384)[None]), atol=1e-5, rtol=0)


def test_gradients_reach_both_projections():
    gate = AttnGate(16, 16, 16, 4, 2)
    q, k = torch.randn(1, 4, 48, 16, requires_grad=True), torch.randn(1, 2, 48, 16)
    (gate(q, k)[..., 0] ** 2).sum().backward()
    assert gate.q_proj.weight.grad.abs().sum() > 0 and gate.k_proj.weight.grad.abs().sum() > 0
