"""Oracle: torchao 0.18's MXTensor (to_mx) and NVFP4Tensor (to_nvfp4), an independent implementation.

Layouts: torchao keeps codes in the input's layout (FP4 packed two per uint8, element 2i in the
low nibble, like lowbit) and non-swizzled scales of shape [M, K / block] (E8M0 as
float8_e8m0fnu, NVFP4 as float8_e4m3fn); NVFP4's `per_tensor_scale` is amax / 2688, the inverse of
lowbit's `global_scale`.

MX: the rules coincide on finite data (floor and rceil), so scales and codes agree exactly.
NVFP4: torchao scales elements by `x * ((1 / per_tensor_scale) / s_blk)` where the spec computes
`x * s_enc / s_blk` (DESIGN section 3). On bf16 inputs the two differ in the last bit for a few
elements, which changes the code only where the spec's value is an exact rounding tie: scales
agree 100 %, codes >= 99.8 %, every differing code is one grid step away at such a tie, and the
dequantized error is not worse than torchao's. Both code sets are decoded with the same float64
arithmetic for that comparison (torchao's own dequantize multiplies in a different fp32 order,
which moves the error in the 8th digit on its own). At a tie the exact scaled value sits within
eps = 2^-20 of the midpoint (two fp32 roundings of a value below 8), so each tie can favour
torchao's choice by at most (s_blk / s_enc)^2 * 2 * h * eps (h the grid step); that sum is the
only slack allowed.
"""
import pytest
import torch

import lowbit
from _util import E2M1_VALUES

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
config = pytest.importorskip("torchao.prototype.mx_formats.config")

SHAPE = (512, 1024)
TIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def sample(dist: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    if dist == "normal":
        return torch.randn(*SHAPE, generator=g).bfloat16()
    chi2 = torch.distributions.Chi2(3.0).sample  # Student-t(3) = N / sqrt(chi2_3 / 3), from seeded draws
    torch.manual_seed(11)
    return (torch.randn(*SHAPE, generator=g) / torch.sqrt(chi2(SHAPE) / 3.0)).bfloat16()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)


def mse(a, b) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
@pytest.mark.parametrize("name,elem", [("mxfp8", torch.float8_e4m3fn), ("mxfp4", torch.float4_e2m1fn_x2)])
@pytest.mark.parametrize("mode", ["floor", "rceil"])
def test_mx_matches_torchao_exactly(backend, dist, name, elem, mode):
    x = sample(dist)
    ao_mode = {"floor": config.ScaleCalculationMode.FLOOR, "rceil": config.ScaleCalculationMode.RCEIL}[mode]
    ao = mx_tensor.MXTensor.to_mx(x, elem, 32, scaling_mode=ao_mode)
    q = lowbit.quantize(x, name, scale_mode=mode, backend=backend)
    assert ao.scale.shape == q.scale.shape
    assert torch.equal(ao.scale.view(torch.uint8), q.scale.view(torch.uint8))
    assert torch.equal(ao.qdata.view(torch.uint8), q.data.view(torch.uint8))
    assert torch.equal(ao.dequantize(torch.float32), q.dequantize(backend=backend))


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_nvfp4_matches_torchao_up_to_ties(backend, dist):
    x = sample(dist)
    amax = x.float().abs().max()
    ao = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=nvfp4_tensor.per_tensor_amax_to_scale(amax))
    q = lowbit.quantize(x, "nvfp4", backend=backend)
    assert torch.equal(ao.scale.view(torch.uint8), q.scale.view(torch.uint8))  # 100 % of scales
    ca, cq = unpack(ao.qdata.view(torch.uint8)), unpack(q.data)
    differ = ca != cq
    agree = 1.0 - float(differ.float().mean())
    assert agree >= 0.998
    # every difference: same sign, adjacent magnitudes, and the spec's scaled value is an exact tie
    assert ((ca[differ] & 8) == (cq[differ] & 8)).all()
    assert ((ca[differ] & 7).int() - (cq[differ] & 7).int()).abs().max() <= 1 if differ.any() else True
    s_blk = q.scale.float().repeat_interleave(16, 1)
    v = (x.float() * q.global_scale / s_blk).abs()
    assert torch.isin(v[differ], TIES).all()
    # decoded error no worse than torchao's
    table = torch.tensor(E2M1_VALUES + tuple(-t for t in E2M1_VALUES))
    assert torch.equal(q.dequantize(backend=backend), table[cq.long()] * s_blk / q.global_scale)
    s64 = q.scale.double().repeat_interleave(16, 1) / q.global_scale.double()
    t64 = table.double()
    ours, theirs = t64[cq.long()] * s64, t64[ca.long()] * s64
    h = (t64[cq.long()] - t64[ca.long()]).abs()[differ]
    slack = float((s64[differ] ** 2 * 2 * h * 2.0**-20).sum()) / x.numel()
    assert mse(ours, x) <= mse(theirs, x) + slack
