"""`torch.library.opcheck` on every lowbit::* custom op with representative arguments.

torch's schema check (test_schema) compares inputs before/after with `allclose`, which has no CPU
kernel for float8 tensors; for calls whose inputs include float8 data or scales it is replaced by
an explicit byte-for-byte check that the op leaves its inputs unchanged.
"""
import pytest
import torch
from torch.library import opcheck

ops = torch.ops.lowbit
NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def raw(t):
    return t.reshape(-1).view(torch.uint8).clone() if t.element_size() == 1 else t.clone()


def check(op, args, float8_inputs=False):
    if not float8_inputs:
        opcheck(op, args)
        return
    before = [raw(a) for a in args if isinstance(a, torch.Tensor)]
    opcheck(op, args, test_utils=NO_SCHEMA)
    op(*args)
    after = [raw(a) for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


QUANTIZE_CASES = [
    ("fp8_e4m3", [32, 64], "nearest", "exact", None, 0),
    ("fp8_e5m2", [1, 64], "stochastic", "rceil", None, 0),
    ("mxfp8", [1, 32], "nearest", "floor", None, 16),
    ("mxfp4", [1, 32], "stochastic", "rceil", None, 0),
    ("nvfp4", [1, 16], "stochastic", "exact", 4.0, 16),
    ("nvfp4", [16, 16], "nearest", "exact", None, 0),
]


@pytest.mark.parametrize("fmt,block,rounding,mode,gamax,had", QUANTIZE_CASES)
def test_quantize_dequantize_qmatmul(backend, fmt, block, rounding, mode, gamax, had):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ga = None if gamax is None else torch.tensor(gamax)
    args = (x, fmt, block, rounding, 3, mode, ga, had, 1, backend)
    check(ops.quantize.default, args)
    data, scale, gs = ops.quantize(*args)
    f8 = data.dtype.is_floating_point or scale.dtype == torch.float8_e4m3fn
    scale2 = scale.reshape(1, 1) if scale.dim() == 0 else scale
    check(ops.dequantize.default, (data, scale2, gs, fmt, block, 64, torch.bfloat16, backend), f8)
    check(ops.qmatmul.default, (data, scale2, gs, fmt, block, data, scale2, gs, fmt, block, 64, torch.float32, backend), f8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cast(backend, dtype, rounding):
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    check(ops.cast.default, (x, dtype, rounding, 9, backend))


@pytest.mark.parametrize("block,seed,inverse", [(16, -1, False), (64, 5, True), (128, 2**40, False)])
def test_hadamard(backend, block, seed, inverse):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    check(ops.hadamard.default, (x, block, seed, inverse, backend))
