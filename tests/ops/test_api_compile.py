"""torch.compile(fullgraph=True) traces through quantize + qmatmul (the ops are opaque custom ops
with fake impls) and gives the same bits as eager."""
import pytest
import torch

import lowbit


@pytest.mark.parametrize("fmt,kw", [("nvfp4", {"hadamard": 16, "rounding": "stochastic"}), ("mxfp8", {})])
def test_compile_fullgraph_same_bits(backend, fmt, kw):
    def f(a, b):
        qa = lowbit.quantize(a, fmt, seed=1, backend=backend, **kw)
        qb = lowbit.quantize(b, fmt, seed=2, backend=backend, **kw)
        return lowbit.qmatmul(qa, qb, out_dtype=torch.bfloat16, backend=backend)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(a, b)
    assert got.dtype == torch.bfloat16 and got.shape == (64, 32)
    assert torch.equal(got.view(torch.int16), f(a, b).view(torch.int16))
