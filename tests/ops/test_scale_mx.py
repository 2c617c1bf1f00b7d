"""OCP MX scales: E8M0 bytes from the floor rule (OCP v1.0) and the rceil option.

floor: e = floor(log2(amax)) - emax_elem, so amax / 2^e lies in [2^emax, 2^(emax+1)) and may
exceed max_elem (then it saturates). rceil: the smallest e with amax / 2^e <= max_elem, so nothing
saturates. Both are clamped to E8M0's [-127, 127]; an all-zero block gets byte 0; a block with
NaN/Inf gets byte 0xFF. Expected bytes are computed here from Python floats (math.frexp).
"""
import math

import pytest
import torch

import lowbit
from lowbit import formats

MX = ["mxfp8", "mxfp8_e5m2", "mxfp4"]
EMAX = {"e4m3": 8, "e5m2": 15, "e2m1": 2}


def floor_log2(a: float) -> int:
    return math.frexp(a)[1] - 1


def ceil_log2_ratio(a: float, mx: float) -> int:
    e = floor_log2(a / mx) if a / mx > 0 else -127
    while a > mx * 2.0**e:
        e += 1
    while e > -127 and a <= mx * 2.0 ** (e - 1):
        e -= 1
    return e


def wide_range_blocks(seed: int, rows: int = 64, cols: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    exps = torch.randint(-140, 120, (rows, cols // 32, 1), generator=g).float()
    return (x.reshape(rows, cols // 32, 32) * torch.pow(2.0, exps)).reshape(rows, cols)


def test_emax_of_elements():
    assert {f.elem.name: f.elem.emax for f in (formats.MXFP8, formats.MXFP8_E5M2, formats.MXFP4)} == EMAX


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("mode", ["floor", "rceil"])
def test_scale_bytes(backend, name, mode):
    fmt = formats.get_format(name)
    x = wide_range_blocks(3)
    q = lowbit.quantize(x, fmt, scale_mode=mode, backend=backend)
    assert q.scale.dtype in (torch.uint8, torch.float8_e8m0fnu) and q.scale.shape == (64, 8)
    amax = x.reshape(64, 8, 32).abs().amax(-1).double()
    want = []
    for a in amax.flatten().tolist():
        if a == 0:
            e = -127
        elif mode == "floor":
            e = floor_log2(a) - EMAX[fmt.elem.name]
        else:
            e = ceil_log2_ratio(a, fmt.max)
        want.append(min(max(e, -127), 127) + 127)
    assert q.scale.view(torch.uint8).flatten().tolist() == want


@pytest.mark.parametrize("name", MX)
def test_rceil_never_saturates_floor_may(backend, name):
    fmt = formats.get_format(name)
    x = wide_range_blocks(4)
    # first block of each row: amax = 1.1 * max_elem * 2^k (its largest element), so floor saturates it
    x[:, 0] = fmt.max * 1.1 * torch.pow(2.0, torch.randint(-20, 20, (64,)).float())
    x[:, 1:32] = 0.01 * x[:, :1] * torch.rand(64, 31)
    for mode in ("floor", "rceil"):
        q = lowbit.quantize(x, fmt, scale_mode=mode, backend=backend)
        e = q.scale.view(torch.uint8).double() - 127
        v = x.double().reshape(64, 8, 32) * torch.pow(2.0, -e).unsqueeze(-1)  # the value rounded onto the grid
        over = v.abs().amax(-1) > fmt.max
        if mode == "rceil":
            assert not over.any()
        else:
            assert over[:, 0].all()
            assert (v.abs().amax(-1) < 2.0 ** (fmt.elem.emax + 1)).all()
            d = q.dequantize(torch.float64)
            sat = d[:, 0].abs() / torch.pow(2.0, e[:, 0])
            assert (sat == fmt.max).all()  # saturated to the largest element


def test_floor_vs_rceil_example(backend):
    # amax 7: floor -> 2^0 and 7 saturates to 6; rceil -> 2^1 and 7/2 = 3.5 ties to 4 (even)
    x = torch.zeros(1, 32)
    x[0, 0] = 7.0
    f = lowbit.quantize(x, "mxfp4", scale_mode="floor", backend=backend)
    r = lowbit.quantize(x, "mxfp4", scale_mode="rceil", backend=backend)
    assert f.scale.view(torch.uint8).item() == 127 and f.dequantize()[0, 0].item() == 6.0
    assert r.scale.view(torch.uint8).item() == 128 and r.dequantize()[0, 0].item() == 8.0


def test_clamped_exponents(backend):
    x = torch.zeros(2, 32)
    x[0, 0] = 2.0**-149  # floor(log2) - 8 = -157 -> clamped to -127
    x[1, 0] = torch.finfo(torch.float32).max  # 127 - 8 = 119: no clamp needed
    q = lowbit.quantize(x, "mxfp8", backend=backend)
    assert q.scale.view(torch.uint8).flatten().tolist() == [0, 119 + 127]


def test_zero_and_nan_blocks(backend):
    x = torch.ones(3, 32)
    x[0] = 0.0
    x[1, 5] = math.nan
    x[2, 7] = -math.inf
    for mode in ("floor", "rceil"):
        q = lowbit.quantize(x, "mxfp8", scale_mode=mode, backend=backend)
        assert q.scale.view(torch.uint8).flatten().tolist() == [0, 255, 255]
