"""Signed zeros, subnormals, NaN, Inf, max finite and all-zero blocks through the scaled formats
(the unscaled casts get every bf16 pattern in test_cast_exhaustive.py)."""
import math

import pytest
import torch

import lowbit
from _util import e2m1_rne

ALL = ["fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp8_e5m2", "mxfp4", "nvfp4"]
ZERO_SCALE = {"fp8": 1.0, "mx": 2.0**-127, "nvfp4": 2.0**-6}
NAN_SCALE_BITS = {"mx": 0xFF, "nvfp4": 0x7F}


def scale_values(q) -> torch.Tensor:
    if q.fmt.kind == "mx":
        return torch.pow(2.0, q.scale.view(torch.uint8).double() - 127)
    return q.scale.double()


@pytest.mark.parametrize("name", ALL)
def test_all_zero_block_and_signed_zeros(backend, name):
    x = torch.zeros(2, 64)
    x[1] = -0.0
    x[0, 40:] = torch.linspace(1, 2, 24)  # a second block that is not zero (block row 0, cols 32..63)
    block = "row" if name.startswith("fp8") else None
    q = lowbit.quantize(x, name, block=block, backend=backend)
    d = q.dequantize()
    assert torch.isfinite(d).all()
    assert torch.equal(d[1], x[1]) and torch.signbit(d[1]).all()  # -0 stays -0
    assert torch.equal(d[0, :32], x[0, :32]) and not torch.signbit(d[0, :32]).any()
    kind = q.fmt.kind
    s = scale_values(q)
    assert (s[1] == ZERO_SCALE[kind]).all()  # the all-zero row's blocks
    if kind == "mx":
        assert (q.scale.view(torch.uint8)[1] == 0).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_poisons_only_its_block(backend, name, bad):
    """NaN/Inf makes its block's scale NaN and decodes as NaN; other blocks are untouched.

    NVFP4 also takes amax over the whole tensor for s_enc, so without `global_amax` every block
    becomes NaN; with a given `global_amax` only the block holding the NaN/Inf does.
    """
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3] = bad
    block = "row" if name.startswith("fp8") else None
    kw = {"global_amax": 8.0} if name == "nvfp4" else {}
    q = lowbit.quantize(x, name, block=block, backend=backend, **kw)
    kind = q.fmt.kind
    if kind == "fp8":
        assert torch.isnan(q.scale[0]).all() and torch.isfinite(q.scale[1]).all()
    else:
        raw = q.scale.view(torch.uint8)
        assert (raw[0, 0] == NAN_SCALE_BITS[kind]).item()
        assert (raw[0, 1:] != NAN_SCALE_BITS[kind]).all() and (raw[1] != NAN_SCALE_BITS[kind]).all()
    d = q.dequantize()
    bk = 64 if kind == "fp8" else q.block[1]
    assert torch.isnan(d[0, :bk]).all()
    assert torch.isfinite(d[0, bk:]).all() and torch.isfinite(d[1]).all()
    with pytest.raises(ValueError, match="x"):
        lowbit.quantize(x, name, block=block, backend=backend, check=True, **kw)
    if name == "nvfp4":
        q = lowbit.quantize(x, name, backend=backend)
        assert torch.isnan(q.global_scale) and torch.isnan(q.dequantize()).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("big", [torch.finfo(torch.bfloat16).max, torch.finfo(torch.float32).max])
def test_max_finite_inputs(backend, name, big):
    """The largest finite bf16 / fp32 inputs: scales stay finite and decoding does not overflow.

    FP8 and NVFP4 put amax on the largest element, so it comes back to within rounding of the
    scale. MX "floor" scales 2^(floor(log2 amax) - emax_elem) = 2^(127 - emax_elem), so amax/scale
    lies in [2^emax, 2^(emax+1)) and saturates to max_elem (the OCP rule): the result is exactly
    max_elem * 2^(127 - emax_elem).
    """
    x = torch.tensor([[big, -big] + [1.0] * 30], dtype=torch.float32).repeat(1, 4)
    fmt = lowbit.formats.get_format(name)
    q = lowbit.quantize(x, fmt, backend=backend)
    d = q.dequantize(torch.float64)
    assert torch.isfinite(d).all()
    if fmt.kind == "mx":
        want = fmt.max * 2.0 ** (127 - fmt.elem.emax)
        assert d[0, :2].tolist() == [want, -want]
    else:
        # amax maps to max_elem up to the fp32 rounding of the scale arithmetic
        rel = float((d[0, :2] / x[0, :2].double() - 1).abs().max())
        assert rel <= 2.0**-22


def test_fp32_subnormal_block_mx(backend):
    # amax 2^-140: floor(log2) - 2 = -142 clamps to E8M0's -127, so elements are x * 2^127
    x = torch.full((1, 32), 2.0**-140)
    x[0, 1] = -(2.0**-127) * 3
    q = lowbit.quantize(x, "mxfp4", backend=backend)
    assert q.scale.view(torch.uint8).item() == 0
    want = torch.tensor([e2m1_rne(v * 2.0**127) * 2.0**-127 for v in x[0].double().tolist()])
    assert torch.equal(q.dequantize(torch.float64)[0], want)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_subnormal_codes_in_tensorwise_quantize(backend, name):
    # amax 448 / 57344 gives scale 1, so tiny inputs land on the subnormal codes exactly
    mx = 448.0 if name == "fp8_e4m3" else 57344.0
    sub = 2.0**-9 if name == "fp8_e4m3" else 2.0**-16
    x = torch.tensor([[mx, sub, -sub, 3 * sub, sub / 2, sub * 0.75]])
    q = lowbit.quantize(x, name, backend=backend)
    assert float(q.scale) == 1.0
    # sub/2 is a tie between 0 and sub: to even (0); 0.75 sub rounds up to sub
    assert q.dequantize()[0].tolist() == [mx, sub, -sub, 3 * sub, 0.0, sub]
