"""NVFP4 two-level scales (DESIGN section 2), recomputed here with plain fp32 torch arithmetic and
torch's own float8_e4m3fn cast (round-to-nearest-even; in range after the clamp).

s_enc = 2688 / amax(tensor) (or `global_amax`); s_blk = e4m3(clamp(amax_blk / 6 * s_enc, 2^-6, 448));
element v = x * s_enc / s_blk rounded to E2M1.
"""
import pytest
import torch

import lowbit
from _util import E2M1_VALUES, e2m1_rne


def decode(packed):
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    return torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float64)[codes]


def expected(x: torch.Tensor, amax_t: float, block=(1, 16)):
    R, K = x.shape
    br, bk = block
    s_enc = torch.tensor(2688.0) / torch.tensor(amax_t, dtype=torch.float32)
    tiles = x.reshape(R // br, br, K // bk, bk).permute(0, 2, 1, 3).reshape(R // br, K // bk, br * bk)
    amax_b = tiles.abs().amax(-1)
    s_blk = torch.clamp(amax_b / torch.tensor(6.0) * s_enc, 2.0**-6, 448.0).to(torch.float8_e4m3fn)
    s_full = s_blk.float().repeat_interleave(br, 0).repeat_interleave(bk, 1)
    v = x * s_enc / s_full
    q = torch.tensor([e2m1_rne(t) for t in v.flatten().tolist()], dtype=torch.float64).reshape(R, K)
    return s_enc, s_blk, q


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_two_level_scales_and_codes(backend, block):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(32, 128, generator=g) * torch.exp(torch.randn(32, 1, generator=g))).bfloat16().float()
    q = lowbit.quantize(x, "nvfp4", block=block, backend=backend)
    s_enc, s_blk, codes = expected(x, float(x.abs().max()), block)
    assert q.global_scale.dtype == torch.float32 and torch.equal(q.global_scale, s_enc)
    assert q.scale.dtype == torch.float8_e4m3fn
    assert torch.equal(q.scale.view(torch.uint8), s_blk.view(torch.uint8))
    assert torch.equal(decode(q.data), codes)
    # decode x' = q * s_blk / s_enc
    s_full = s_blk.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    assert torch.equal(q.dequantize(), codes.float() * s_full / s_enc)


def test_global_amax_below_true_amax_saturates(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 64, generator=g)
    amax = float(x.abs().max())
    q = lowbit.quantize(x, "nvfp4", global_amax=amax / 8, backend=backend)
    s_enc, s_blk, codes = expected(x, amax / 8)
    assert torch.equal(q.global_scale, s_enc)
    assert torch.equal(q.scale.view(torch.uint8), s_blk.view(torch.uint8))
    big = x.reshape(16, 4, 16).abs().amax(-1) / 6 * s_enc > 448
    assert big.any() and (q.scale.float()[big] == 448).all()
    d = decode(q.data).reshape(16, 4, 16)
    # in a saturated block the largest element is clamped to 6 (code magnitude 7)
    assert (d.abs().amax(-1)[big] == 6).all()
    assert torch.equal(decode(q.data), codes)


def test_all_zero_block_gets_min_scale_and_zero_codes(backend):
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.arange(1, 17)
    q = lowbit.quantize(x, "nvfp4", backend=backend)
    assert q.scale[0].float().tolist() == [2.0**-6, 2.0**-6] and q.scale[1, 0].item() == 2.0**-6
    assert (q.data[0] == 0).all() and (q.data[1, :8] == 0).all()
    z = lowbit.quantize(torch.zeros(4, 16), "nvfp4", backend=backend)
    assert z.global_scale.item() == 1.0 and (z.scale.float() == 2.0**-6).all()
    assert torch.equal(z.dequantize(), torch.zeros(4, 16))
