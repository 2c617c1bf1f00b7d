"""Every FP8 code (256 per format) and every FP4 code (16) decoded through `lowbit.dequantize`,
against the textbook sign/exponent/mantissa definition; and the FP4 nibble order."""
import math

import pytest
import torch

import lowbit
from _util import E2M1_VALUES, decode_minifloat
from lowbit import formats
from lowbit.qtensor import QTensor

FP8 = {
    "fp8_e4m3": (torch.float8_e4m3fn, dict(ebits=4, mbits=3, bias=7, ieee_specials=False, nan_all_ones=True)),
    "fp8_e5m2": (torch.float8_e5m2, dict(ebits=5, mbits=2, bias=15, ieee_specials=True, nan_all_ones=False)),
}


def assert_same(got: torch.Tensor, want: list[float]):
    w = torch.tensor(want, dtype=torch.float64)
    g = got.double()
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(g), nan)
    assert torch.equal(g[~nan], w[~nan])
    assert torch.equal(torch.signbit(g[~nan]), torch.signbit(w[~nan]))


@pytest.mark.parametrize("name", sorted(FP8))
def test_every_fp8_code(backend, name):
    dtype, spec = FP8[name]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = QTensor(codes.view(dtype), torch.tensor(1.0), None, formats.get_format(name), (256,), 0, (1, 256))
    got = lowbit.dequantize(q, backend=backend)
    assert_same(got, [decode_minifloat(c, **spec) for c in range(256)])


def test_fp8_code_facts():
    e4 = [decode_minifloat(c, 4, 3, 7, False, True) for c in range(256)]
    e5 = [decode_minifloat(c, 5, 2, 15, True, False) for c in range(256)]
    assert max(v for v in e4 if not math.isnan(v)) == 448.0 == formats.FP8_E4M3.max
    assert max(v for v in e5 if not math.isinf(v) and not math.isnan(v)) == 57344.0 == formats.FP8_E5M2.max
    assert sum(math.isnan(v) for v in e4) == 2 and sum(math.isnan(v) for v in e5) == 6
    assert e4[1] == 2.0**-9 and e5[1] == 2.0**-16  # smallest subnormals


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_every_fp4_code(backend, name):
    fmt = formats.get_format(name)
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # 32 elements
    packed = codes[0::2] | (codes[1::2] << 4)
    if fmt.kind == "mx":
        scale, gs, block = torch.tensor([[127]], dtype=torch.uint8), None, (1, 32)
    else:
        scale, gs, block = torch.ones(1, 2).to(torch.float8_e4m3fn), torch.tensor(1.0), (1, 16)
    q = QTensor(packed.reshape(1, 16), scale, gs, fmt, (1, 32), 1, block)
    got = lowbit.dequantize(q, backend=backend).flatten()
    table = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert_same(got, table * 2)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_fp4_packing_low_nibble_first(backend, name):
    # element 0 = 0.5 (code 1), element 1 = -6 (code 0xF), element 2 = 3 (code 5), element 3 = 0 (code 0)
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([0.5, -6.0, 3.0, 0.0])
    x[0, 16] = 6.0  # both NVFP4 blocks get the same scale
    q = lowbit.quantize(x, name, global_amax=448.0 if name == "nvfp4" else None, backend=backend)
    assert q.data.dtype == torch.uint8 and q.data.shape == (1, 16)
    assert q.data[0, 0].item() == 0x01 | (0x0F << 4)
    assert q.data[0, 1].item() == 0x05
    assert q.data[0, 8].item() == 0x07
