"""attention_with_block_pool and block_sparse_attention against SDPA, the naive pooled map, and
every backend against the reference.

Tolerances: 1e-5 on outputs (fp32 attention summed in a different order than SDPA: errors of a
few ulps of values of size ~1, measured <= 1e-6) and 1e-6 on pooled maps (probabilities <= 1, same
softmax arithmetic up to the block split), as the issue specifies.
"""
import pytest
import torch
import torch.nn.functional as F

from lowbit.attention import attention_with_block_pool, block_sparse_attention
from lowbit import backends
from lowbit.attention import ops as aops
from lowbit.backends.ref import attention as R

SHAPES = [  # (batch, q_heads, kv_heads, seq, head_dim, block)
    (2, 4, 4, 64, 32, 16),
    (1, 4, 2, 100, 32, 16),   # GQA, seq not a multiple of the block
    (2, 2, 1, 37, 16, 32),    # partial last block
    (1, 2, 2, 15, 16, 16),    # a single, partial block
]


def qkv(B, H, Hk, S, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g).to(dtype) for h in (H, Hk, Hk)]


def sdpa(q, k, v, causal=True, mask=None):
    H = q.shape[1]
    return F.scaled_dot_product_attention(q, R.expand_kv(k, H), R.expand_kv(v, H), attn_mask=mask,
                                          is_causal=causal and mask is None)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_pool_matches_sdpa_and_naive(shape, causal):
    B, H, Hk, S, D, bs = shape
    q, k, v = qkv(B, H, Hk, S, D)
    out, pooled = attention_with_block_pool(q, k, v, bs, causal)
    torch.testing.assert_close(out, sdpa(q, k, v, causal), atol=1e-5, rtol=0)
    _, naive = R.naive_attention_with_block_pool(q, k, v, bs, causal)
    torch.testing.assert_close(pooled, naive, atol=1e-6, rtol=0)
    n = -(-S // bs)
    assert pooled.shape == (B, H, n, n) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.sum(-1), torch.ones(B, H, n), atol=1e-6, rtol=0)
    if causal:
        assert (pooled.triu(1) == 0).all()


def test_block_pool_is_the_max_probability_of_each_block():
    # hand check of one entry: block (1, 0) of a 2-block sequence, before row normalisation
    q, k, v = qkv(1, 1, 1, 32, 16, seed=3)
    _, pooled = attention_with_block_pool(q, k, v, 16, True)
    p = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(torch.ones(32, 32).triu(1).bool(), float("-inf")), -1)
    raw = torch.stack([p[0, 0, 16:, :16].max(), p[0, 0, 16:, 16:].max()])
    torch.testing.assert_close(pooled[0, 0, 1], raw / raw.sum(), atol=1e-6, rtol=0)


def test_block_pool_scale_and_dtype():
    q, k, v = qkv(1, 2, 2, 48, 16, dtype=torch.bfloat16)
    out, pooled = attention_with_block_pool(q, k, v, 16, True, scale=0.1)
    assert out.dtype == torch.bfloat16 and pooled.dtype == torch.float32
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.1)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=0)  # bf16 output rounding: 2^-8 relative


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_sparse_all_true_is_sdpa(shape, causal):
    B, H, Hk, S, D, bs = shape
    q, k, v = qkv(B, H, Hk, S, D, seed=1)
    n = -(-S // bs)
    mask = torch.ones(B, H, n, n, dtype=torch.bool)
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask, bs, causal), sdpa(q, k, v, causal),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_sparse_random_mask_is_masked_sdpa(shape, causal):
    B, H, Hk, S, D, bs = shape
    q, k, v = qkv(B, H, Hk, S, D, seed=2)
    n = -(-S // bs)
    mask = torch.rand(B, H, n, n, generator=torch.Generator().manual_seed(4)) < 0.3
    full = R.expand_block_mask(mask, bs, S, causal)
    out = block_sparse_attention(q, k, v, mask, bs, causal)
    torch.testing.assert_close(out, sdpa(q, k, v, causal, mask=full), atol=1e-5, rtol=0)


def test_block_sparse_unselected_blocks_do_not_matter():
    q, k, v = qkv(1, 2, 2, 64, 16, seed=5)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[..., 3, 0] = True
    out = block_sparse_attention(q, k, v, mask, 16, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 16:48] = 1e3  # blocks 1 and 2 are unselected for query block 3
    v2[:, :, 16:48] = -1e3
    out2 = block_sparse_attention(q, k2, v2, mask, 16, True)
    torch.testing.assert_close(out[:, :, 48:], out2[:, :, 48:], atol=0, rtol=0)


BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_every_backend_matches_ref(backend, shape, causal):
    reason = backends.why_unavailable(backend, "block_sparse_attention", "cpu")
    if reason:
        pytest.skip(f"{backend}: {reason}")
    B, H, Hk, S, D, bs = shape
    q, k, v = qkv(B, H, Hk, S, D, seed=6)
    n = -(-S // bs)
    for density in (0.2, 0.6, 1.0):
        mask = torch.rand(B, H, n, n, generator=torch.Generator().manual_seed(7)) < density
        ref = block_sparse_attention(q, k, v, mask, bs, causal, backend="ref")
        out = block_sparse_attention(q, k, v, mask, bs, causal, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_triton_block_pool_matches_ref(shape, causal):
    reason = backends.why_unavailable("triton", "attention_with_block_pool", "cpu")
    if reason:
        pytest.skip(f"triton: {reason}")
    B, H, Hk, S, D, bs = shape
    q, k, v = qkv(B, H, Hk, S, D, seed=15)
    out, pooled = attention_with_block_pool(q, k, v, bs, causal, backend="triton")
    ref_out, ref_pooled = attention_with_block_pool(q, k, v, bs, causal, backend="ref")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)


def test_cpu_backend_both_paths_with_varied_row_counts(monkeypatch):
    # many rows with different numbers of selected blocks; the PyTorch path split over several chunks
    from lowbit.backends.cpu import attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "PAIRS_PER_CHUNK", 5)
    q, k, v = qkv(2, 2, 1, 16 * 12 - 3, 16, seed=8)
    mask = torch.rand(2, 2, 12, 12, generator=torch.Generator().manual_seed(9)) < 0.5
    for causal in (True, False):
        ref = block_sparse_attention(q, k, v, mask, 16, causal, backend="ref")
        torch.testing.assert_close(cpu_attention.blocks_in_torch(q, k, v, mask, 16, causal, 0.25), ref,
                                   atol=1e-5, rtol=0)
        if cpu_attention._native() is not None:
            torch.testing.assert_close(cpu_attention.block_sparse_attention(q, k, v, mask, 16, causal, 0.25), ref,
                                       atol=1e-5, rtol=0)


def test_cpu_native_kernel_is_built():
    from lowbit.backends.cpu import attention as cpu_attention

    pytest.importorskip("lowbit._C")
    if cpu_attention._native() is None:
        pytest.skip("lowbit._C predates csrc/cpu/attention.cpp; rebuild with pip install -e .")
    q, k, v = qkv(1, 4, 2, 200, 64, seed=13)
    mask = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(14)) < 0.4
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        a, b, c = (x.to(dtype) for x in (q, k, v))
        out = cpu_attention.block_sparse_attention(a, b, c, mask, 64, True, 0.125)
        assert out.dtype == dtype
        ref = block_sparse_attention(a, b, c, mask, 64, True, backend="ref")
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)  # bf16: output rounding 2^-8


def test_auto_backend_on_cpu_is_the_fast_one():
    assert backends.resolve("block_sparse_attention", "cpu") == "cpu"
    assert backends.resolve("attention_with_block_pool", "cpu") == "ref"


def test_opcheck():
    q, k, v = qkv(1, 2, 1, 40, 16, seed=10)
    mask = torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(11)) < 0.5
    torch.library.opcheck(aops._block_sparse_attention, (q, k, v, mask, 16, True, 0.25, "auto"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(aops._attention_with_block_pool, (q, k, v, 16, True, 0.25, "auto"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_traces_the_ops():
    q, k, v = qkv(1, 2, 2, 32, 16, seed=12)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)

    def f(q, k, v):
        out, pooled = attention_with_block_pool(q, k, v, 16, True)
        return block_sparse_attention(q, k, v, mask, 16, True) + out, pooled

    out, pooled = torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, 2 * sdpa(q, k, v), atol=2e-5, rtol=0)
