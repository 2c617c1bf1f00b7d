"""INT4 on the CPU (C++), Triton and CUDA backends against the spec (ref), bit for bit.

Codes and records must have identical bytes; decoded values identical bits, except that any NaN
matches any NaN. Triton runs in its interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py), so
its shapes stay tiny; the CUDA cases skip without a GPU.
"""
import math

import pytest
import torch

import lowbit
from lowbit import backends

INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t):
    t = t.detach().contiguous().cpu()
    return t.view(INT[t.element_size()]) if t.is_floating_point() else t


def same(ours, spec, what, nan_any=False):
    assert ours.dtype == spec.dtype and ours.shape == spec.shape, (what, ours.shape, spec.shape)
    ours, spec = ours.cpu(), spec.cpu()
    if nan_any:
        nan = torch.isnan(spec)
        assert torch.equal(torch.isnan(ours), nan), f"{what}: NaN at different places"
        ours, spec = torch.where(nan, 0, ours), torch.where(nan, 0, spec)
    diff = bits(ours) != bits(spec)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at flat {diff.flatten().nonzero()[0].item()}"


def inputs(shape, seed, dtype):
    """Random groups of varied magnitude, with NaN / Inf groups, |x| ties, zeros, -0 and subnormals mixed in
    (along the last dim, the quantized one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, shape[:-1] + (1,), generator=g).float())
    flat = x.view(-1, shape[-1])
    flat[0, :3] = torch.tensor([2.5, -2.5, 2.5])  # ties among the largest |x|
    if flat.shape[0] > 2:
        flat[1] = 0.0
        flat[1, 1::2] = -0.0
        flat[2, 1] = math.nan
    if flat.shape[0] > 3:
        flat[3, -1] = -math.inf
        flat[3, :4] = torch.tensor([1e-40, -1e-41, 3e-39, 1e-45])
    if flat.shape[0] > 4:
        flat[4, :2] = torch.tensor([3e38, -3e38])  # max - min overflows: an Inf weight scale (fp16: an Inf group)
    return x.to(dtype)


# (fmt, shape with the quantized dim last, group, the axis it is moved to)
CASES = [("int4_weight", (6, 64), 32, -1), ("int4_act", (6, 64), 32, -1), ("int4_act", (5, 30), 10, -1),
         ("int4_weight", (5, 30), 5, -1), ("int4_act", (2, 3, 32), 16, 1), ("int4_weight", (4, 16), 16, 0),
         ("int4_act", (4, 6), 2, -1), ("int4_weight", (3, 2, 512), 256, -1), ("int4_act", (3, 2, 512), 256, -1)]


def check_backend(name, device, cases=CASES, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    for (fmt, shape, group, axis), dtype, rounding in ((c, d, r) for c in cases for d in dtypes
                                                       for r in ("nearest", "stochastic")):
        what = f"{name} {fmt} {shape} g={group} axis={axis} {dtype} {rounding}"
        x = inputs(shape, len(what), dtype).movedim(-1, axis)
        kw = dict(block=(1, group), axis=axis, rounding=rounding, seed=2**62 + 7)
        spec = lowbit.quantize(x, fmt, backend="ref", **kw)
        ours = lowbit.quantize(x.to(device), fmt, backend=name, **kw)
        same(ours.data, spec.data, f"{what}: codes")
        same(ours.scale, spec.scale, f"{what}: record")
        for out in (torch.float32, torch.bfloat16):
            same(ours.dequantize(out, backend=name), spec.dequantize(out, backend="ref"), f"{what}: decoded {out}",
                 nan_any=True)


def test_cpu_matches_ref():
    reason = backends.why_unavailable("cpu", "quantize", "cpu")
    if reason:
        pytest.skip(f"cpu backend unavailable: {reason}")
    check_backend("cpu", "cpu")


def test_cpu_is_the_default_and_rejects_bad_arguments():
    if backends.why_unavailable("cpu", "quantize", "cpu"):
        pytest.skip("cpu backend unavailable")
    from lowbit import _C

    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="group"):
        _C.int4_quantize(x, False, 3, 0, 0, 1)
    with pytest.raises(RuntimeError, match="record"):
        _C.int4_dequantize(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, 2), False, 32, 64)
    q = lowbit.quantize(x, "int4_act", block=(1, 32))  # auto: the C++ kernel on CPU
    same(q.scale, lowbit.quantize(x, "int4_act", block=(1, 32), backend="ref").scale, "auto")


@pytest.mark.triton
def test_triton_matches_ref():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = backends.why_unavailable("triton", "quantize", device)
    if reason:
        pytest.skip(f"triton backend unavailable: {reason}")
    cases = CASES if device == "cuda" else CASES[:7]  # the interpreter is slow: the small shapes
    check_backend("triton", device, cases, (torch.float32, torch.bfloat16) if device == "cpu" else
                  (torch.float32, torch.bfloat16, torch.float16))


@pytest.mark.triton
def test_triton_qmatmul_dequantizes():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backends.why_unavailable("triton", "qmatmul", device):
        pytest.skip("triton backend unavailable")
    a = lowbit.quantize(inputs((4, 32), 1, torch.float32).nan_to_num(0, 0, 0), "int4_act", block=(1, 32))
    b = lowbit.quantize(torch.randn(8, 32), "int4_weight", block=(1, 32))
    want = lowbit.qmatmul(a, b, backend="ref")
    a, b = (lowbit.QTensor(q.data.to(device), q.scale.to(device), None, q.fmt, q.shape, q.axis, q.block) for q in (a, b))
    same(lowbit.qmatmul(a, b, backend="triton"), want.to(device), "qmatmul")


@pytest.mark.cuda
def test_cuda_matches_ref():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = backends.why_unavailable("cuda", "quantize", "cuda")
    if reason:
        pytest.skip(f"cuda backend unavailable: {reason}")
    check_backend("cuda", "cuda")
    big = torch.randn(1024, 4096, device="cuda")
    for fmt in ("int4_weight", "int4_act"):
        for rounding in ("nearest", "stochastic"):
            ours = lowbit.quantize(big, fmt, rounding=rounding, seed=3, backend="cuda")
            spec = lowbit.quantize(big.cpu(), fmt, rounding=rounding, seed=3, backend="ref")
            same(ours.data, spec.data, f"{fmt} big codes")
            same(ours.scale, spec.scale, f"{fmt} big record")
