"""FP8 scales: tensor-wise, row-wise, 1x128 and 128x128 blocks (fp32 scales, x ~ q * d).

d = amax / max_elem per block (1 for an all-zero block, at least 2^-126), elements x / d cast with
torch's own saturating float8 cast; "floor"/"rceil" round d down/up to a power of two.
"""
import math

import pytest
import torch

import lowbit

DT = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def tiles_amax(x, br, bk):
    R, K = x.shape
    return x.reshape(R // br, br, K // bk, bk).abs().amax((1, 3))


def expected(x, name, br, bk, mode="exact"):
    dtype, mx = DT[name]
    amax = tiles_amax(x, br, bk)
    d = amax / torch.tensor(mx)
    d = torch.where(amax == 0, torch.ones_like(d), d).clamp(min=2.0**-126)
    if mode != "exact":
        e = [math.frexp(v)[1] - 1 for v in d.flatten().tolist()]
        if mode == "rceil":
            e = [k + (v != 2.0**k) for k, v in zip(e, d.flatten().tolist())]
        d = torch.tensor([2.0**k for k in e], dtype=torch.float32).reshape(d.shape)
    full = d.repeat_interleave(br, 0).repeat_interleave(bk, 1)
    v = x / full
    return d, v.clamp(-mx, mx).to(dtype)


@pytest.mark.parametrize("name", sorted(DT))
@pytest.mark.parametrize("block", [None, "row", (1, 128), (128, 128)])
@pytest.mark.parametrize("mode", ["exact", "floor", "rceil"])
def test_fp8_scales_and_codes(backend, name, block, mode):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 384, generator=g) * torch.exp(2 * torch.randn(256, 1, generator=g))
    x[:128, :128] = 0.0  # an all-zero 128x128 tile
    q = lowbit.quantize(x, name, block=block, scale_mode=mode, backend=backend)
    br, bk = {None: (256, 384), "row": (1, 384)}.get(block, block)
    d, codes = expected(x, name, br, bk, mode)
    assert q.scale.dtype == torch.float32
    if block is None:
        assert q.scale.shape == () and torch.equal(q.scale.reshape(1, 1), d)
    else:
        assert q.scale.shape == d.shape and torch.equal(q.scale, d)
    assert torch.equal(q.data.view(torch.uint8), codes.view(torch.uint8))
    if mode == "rceil":
        assert (x.abs() <= DT[name][1] * d.repeat_interleave(br, 0).repeat_interleave(bk, 1)).all()
    if block == (128, 128):
        assert (q.scale[0, 0] == 1.0).item()  # the all-zero tile


def test_fp8_tiny_amax_clamps_scale(backend):
    x = torch.full((1, 128), 2.0**-140)
    q = lowbit.quantize(x, "fp8_e4m3", backend=backend)
    assert q.scale.item() == 2.0**-126
