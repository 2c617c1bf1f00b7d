"""Bad input raises ValueError/TypeError whose message names the argument; edge inputs work."""
import pytest
import torch

import lowbit

X = torch.randn(4, 64)


@pytest.mark.parametrize("call,exc,arg", [
    (lambda: lowbit.quantize(torch.randn(4, 40), "mxfp8"), ValueError, "block"),
    (lambda: lowbit.quantize(torch.randn(4, 24), "nvfp4"), ValueError, "block"),
    (lambda: lowbit.quantize(torch.randn(24, 32), "nvfp4", block=(16, 16)), ValueError, "block"),
    (lambda: lowbit.quantize(torch.randn(4, 100), "fp8_e4m3", block=(1, 128)), ValueError, "block"),
    (lambda: lowbit.quantize(X, "mxfp4", block=(1, 16)), ValueError, "block"),
    (lambda: lowbit.quantize(torch.ones(4, 64, dtype=torch.int32), "mxfp8"), TypeError, "x"),
    (lambda: lowbit.quantize(torch.ones(4, 64, dtype=torch.complex64), "mxfp8"), TypeError, "x"),
    (lambda: lowbit.quantize(torch.ones(4, 64, dtype=torch.bool), "nvfp4"), TypeError, "x"),
    (lambda: lowbit.quantize(torch.ones(4, 64, dtype=torch.uint8), "nvfp4"), TypeError, "x"),
    (lambda: lowbit.quantize(X.numpy(), "nvfp4"), TypeError, "x"),
    (lambda: lowbit.quantize(torch.tensor(1.0), "fp8_e4m3"), ValueError, "x"),
    (lambda: lowbit.quantize(X, "fp6"), ValueError, "fmt"),
    (lambda: lowbit.quantize(X, 3), ValueError, "fmt"),
    (lambda: lowbit.quantize(X, "mxfp8", backend="tpu"), ValueError, "backend"),
    (lambda: lowbit.quantize(X, "mxfp8", rounding="up"), ValueError, "rounding"),
    (lambda: lowbit.quantize(X, "mxfp8", scale_mode="ceil"), ValueError, "scale_mode"),
    (lambda: lowbit.quantize(X, "mxfp8", seed=-1), ValueError, "seed"),
    (lambda: lowbit.quantize(X, "mxfp8", axis=2), ValueError, "axis"),
    (lambda: lowbit.quantize(X, "mxfp8", global_amax=1.0), ValueError, "global_amax"),
    (lambda: lowbit.quantize(X, "nvfp4", hadamard=24), ValueError, "hadamard"),
    (lambda: lowbit.quantize(X, "nvfp4", hadamard=8), ValueError, "hadamard"),
    (lambda: lowbit.quantize(X, "nvfp4", hadamard=128), ValueError, "hadamard"),
    (lambda: lowbit.hadamard(X, 48), ValueError, "block"),
    (lambda: lowbit.hadamard(X, 128), ValueError, "block"),
    (lambda: lowbit.hadamard(X, 65536), ValueError, "block"),
    (lambda: lowbit.hadamard(torch.ones(4, 64, dtype=torch.int64), 16), TypeError, "x"),
    (lambda: lowbit.hadamard(torch.tensor(2.0), 16), ValueError, "x"),
    (lambda: lowbit.cast(X, torch.int8), TypeError, "dtype"),
    (lambda: lowbit.cast(X.to(torch.complex64), torch.bfloat16), TypeError, "x"),
    (lambda: lowbit.stochastic_round(X, torch.float32), ValueError, "dtype"),
    (lambda: lowbit.stochastic_round(X, torch.float64), ValueError, "dtype"),
    (lambda: lowbit.dequantize(X), TypeError, "q"),
    (lambda: lowbit.qmatmul(X, X), TypeError, "a"),
    (lambda: lowbit.qmatmul(lowbit.quantize(X, "mxfp8"), lowbit.quantize(torch.randn(4, 32), "mxfp8")), ValueError, "b"),
    (lambda: lowbit.qmatmul(lowbit.quantize(X, "mxfp8"),
                            lowbit.quantize(torch.randn(64, 64), "mxfp8", axis=0)), ValueError, "b"),
])
def test_bad_input_names_the_argument(call, exc, arg):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(arg + ":") or f"{arg!r}" in str(info.value) or f" {arg} " in str(info.value), str(info.value)


def test_unknown_backend_in_context():
    with pytest.raises(ValueError, match="backend"):
        with lowbit.use_backend("gpu9000"):
            pass


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "mxfp8", "mxfp4", "nvfp4"])
def test_empty_tensors(backend, fmt):
    for shape in [(0, 64), (3, 0, 32)]:
        x = torch.empty(shape)
        q = lowbit.quantize(x, fmt, backend=backend)
        assert q.shape == x.shape
        assert lowbit.dequantize(q, backend=backend).shape == x.shape
    assert lowbit.hadamard(torch.empty(0, 32), 16, backend=backend).shape == (0, 32)
    assert lowbit.cast(torch.empty(0, 5), torch.bfloat16, backend=backend).shape == (0, 5)
    a = lowbit.quantize(torch.empty(0, 64), fmt, backend=backend)
    b = lowbit.quantize(torch.randn(2, 64), fmt, backend=backend)
    assert torch.equal(lowbit.qmatmul(a, b, backend=backend), torch.zeros(0, 2))


@pytest.mark.parametrize("fmt", ["fp8_e5m2", "mxfp8", "mxfp4", "nvfp4"])
def test_non_contiguous_inputs(backend, fmt):
    base = torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    x = base.t()[:, ::2]  # (96, 32) strided view, not contiguous
    assert not x.is_contiguous()
    q = lowbit.quantize(x, fmt, backend=backend)
    r = lowbit.quantize(x.contiguous(), fmt, backend=backend)
    assert torch.equal(q.data.view(torch.uint8), r.data.view(torch.uint8))
    assert torch.equal(q.scale.reshape(-1).view(torch.uint8), r.scale.reshape(-1).view(torch.uint8))
    assert torch.equal(lowbit.hadamard(x, 32, seed=1, backend=backend), lowbit.hadamard(x.contiguous(), 32, seed=1, backend=backend))
    assert torch.equal(lowbit.cast(x, torch.bfloat16, rounding="stochastic", backend=backend),
                       lowbit.cast(x.contiguous(), torch.bfloat16, rounding="stochastic", backend=backend))


def test_other_axis_equals_moved_axis(backend):
    x = torch.randn(64, 3, 5, generator=torch.Generator().manual_seed(5))
    q = lowbit.quantize(x, "mxfp8", axis=0, backend=backend)
    r = lowbit.quantize(x.movedim(0, -1).contiguous(), "mxfp8", backend=backend)
    assert torch.equal(q.data.view(torch.uint8), r.data.view(torch.uint8))
    assert torch.equal(q.dequantize(backend=backend), r.dequantize(backend=backend).movedim(-1, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_float_input_dtypes(backend, dtype):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    q = lowbit.quantize(x.to(dtype), "nvfp4", backend=backend)
    r = lowbit.quantize(x.to(dtype).float(), "nvfp4", backend=backend)
    assert torch.equal(q.data, r.data)
