"""The CUDA backend against the reference backend (the spec), on the same CUDA tensors.

quantize, dequantize, cast and hadamard must agree bit for bit (atol = 0) on every format,
rounding, block, input dtype, Hadamard setting and quantization axis, special values included.
Floating outputs are compared as bit patterns, with positions where both sides are NaN treated
as equal (a GPU's NaN payload is not part of the spec; the NaN codes of quantized data are).
qmatmul is the one op compared with a tolerance: tensor-core GEMMs (torch._scaled_mm) sum the
K products in another order than torch.mm, so two correct results differ by fp32 rounding of a
K-term sum, bounded below from K.

The GPU tests skip without a CUDA device or without the built extension; the first two tests
run everywhere and check that lowbit works and explains itself without the extension.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

import lowbit
from lowbit import backends

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- CPU-side (always run)
def test_cuda_backend_is_unavailable_for_cpu_tensors_with_a_reason():
    reason = backends.why_unavailable("cuda", "quantize", "cpu")
    assert isinstance(reason, str) and reason
    if backends.load("cuda") is not None and backends.load("cuda").unavailable() is None:
        assert "not cpu" in reason  # built and a GPU present: it just does not run on CPU tensors
    else:
        assert "lowbit._C_cuda" in reason or "CUDA device" in reason
    # Automatic choice on CPU never lands on the CUDA backend.
    assert backends.resolve("quantize", "cpu") != "cuda"


def test_import_lowbit_works_without_the_cuda_extension():
    code = (
        "import sys\n"
        "sys.modules['lowbit._C_cuda'] = None\n"  # makes `import lowbit._C_cuda` fail, as on a CPU-only build
        "import torch, lowbit\n"
        "from lowbit import backends\n"
        "reason = backends.why_unavailable('cuda', 'quantize', 'cuda')\n"
        "assert reason and 'lowbit._C_cuda is not built' in reason, reason\n"
        "q = lowbit.quantize(torch.randn(4, 32), 'mxfp8')\n"
        "assert q.dequantize().shape == (4, 32)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- GPU
def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return backends.why_unavailable("cuda", "quantize", "cuda")


needs_cuda = pytest.mark.skipif(_cuda_reason() is not None, reason=f"CUDA backend unavailable: {_cuda_reason()}")

DEV = "cuda"
F8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in F8 or t.dtype == torch.uint8:
        return t.view(torch.uint8).to(torch.int64)
    if t.dtype == torch.float32:
        return t.view(torch.int32).to(torch.int64)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).to(torch.int64)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    raise AssertionError(t.dtype)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality; for float tensors a NaN on both sides counts as equal."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = _bits(got), _bits(want)
    same = g == w
    if got.dtype.is_floating_point and got.dtype not in F8:
        same |= torch.isnan(got) & torch.isnan(want)
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        idx = [tuple(i) for i in bad]
        detail = [(i, hex(int(g[i])), hex(int(w[i]))) for i in idx]
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} differ, first (index, cuda, ref): {detail}")


def assert_same_qtensor(qc: lowbit.QTensor, qr: lowbit.QTensor, what: str) -> None:
    assert_same_bits(qc.data, qr.data, f"{what} data")
    assert_same_bits(qc.scale, qr.scale, f"{what} scale")
    if qr.global_scale is not None:
        assert_same_bits(qc.global_scale, qr.global_scale, f"{what} global_scale")


def _inputs(shape, dtype, seed: int, specials: bool) -> torch.Tensor:
    """Normal data with magnitudes spread over ~2^-20 .. 2^20 by row, optionally with special values."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    x = x * torch.exp2(torch.randint(-20, 21, shape[:-1] + (1,), generator=g).float())
    flat = x.view(-1)
    # Exact ties and grid points of the element formats, at random places.
    ties = torch.tensor([0.25, 0.75, 1.25, 2.5, 5.0, 448.0, 464.0, 57344.0, 61440.0, 6.0, 3.5])
    pos = torch.randint(0, flat.numel(), (ties.numel(),), generator=g)
    flat[pos] = ties
    if specials:
        sp = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-40, -1e-45, 1e-30])
        pos = torch.randint(0, flat.numel(), (sp.numel(),), generator=g)
        flat[pos] = sp
        x.view(-1, shape[-1])[0].zero_()  # an all-zero row: all-zero blocks
    return x.to(dtype).to(DEV)


FORMAT_CASES = [
    # (format, block, scale modes)
    ("fp8_e4m3", None, ("exact", "floor", "rceil")),
    ("fp8_e4m3", "row", ("exact", "rceil")),
    ("fp8_e4m3", (1, 16), ("exact", "floor")),
    ("fp8_e4m3", (16, 16), ("exact",)),
    ("fp8_e5m2", None, ("exact", "rceil")),
    ("fp8_e5m2", "row", ("exact", "floor")),
    ("fp8_e5m2", (1, 16), ("exact",)),
    ("fp8_e5m2", (16, 16), ("exact", "rceil")),
    ("mxfp8", (1, 32), ("floor", "rceil")),
    ("mxfp8_e5m2", (1, 32), ("floor", "rceil")),
    ("mxfp4", (1, 32), ("floor", "rceil")),
    ("nvfp4", (1, 16), ("exact",)),
    ("nvfp4", (16, 16), ("exact",)),
]
SHAPE = (32, 16, 64)  # axis -1: K = 64; axis 0: K = 32 (inner 1024); axis 1: K = 16 (inner 64)


def _case_id(c):
    return f"{c[0]}-{c[1]}"


def _applies(case, axis) -> bool:
    """16x16 tiles are for 2-D weights (covered along the last axis); a block must divide the quantized dim.
    Combinations that do not apply are not generated: on a GPU every cuda test must run (gpu-check)."""
    block = case[1]
    return not (block == (16, 16) and axis != -1) and not (isinstance(block, tuple) and SHAPE[axis] % block[1])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case,axis", [(c, a) for c in FORMAT_CASES for a in (-1, 0, 1) if _applies(c, a)],
                         ids=[f"{_case_id(c)}-axis{a}" for c in FORMAT_CASES for a in (-1, 0, 1) if _applies(c, a)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("hadamard", [None, 16])
def test_quantize_bit_exact(case, rounding, axis, hadamard):
    fmt, block, modes = case
    for dtype, specials in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        x = _inputs(SHAPE, dtype, seed=zlib.crc32(f"{fmt}{block}{rounding}{axis}".encode()), specials=specials)
        for mode in modes:
            kw = dict(block=block, axis=axis, rounding=rounding, seed=123456789012, scale_mode=mode, hadamard=hadamard)
            qc = lowbit.quantize(x, fmt, backend="cuda", **kw)
            qr = lowbit.quantize(x, fmt, backend="ref", **kw)
            what = f"{fmt} {block} {rounding} axis={axis} hadamard={hadamard} {dtype} {mode}"
            assert_same_qtensor(qc, qr, what)
            for out in (torch.float32, torch.bfloat16, torch.float16):
                assert_same_bits(qc.dequantize(out, backend="cuda"), qr.dequantize(out, backend="ref"),
                                 f"{what} dequantize -> {out}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("block", [None, "row", (1, 5), (1, 6), (1, 12), (3, 3), (2, 2), (1, 60)])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_fp8_odd_blocks_bit_exact(block, fmt, rounding):
    # K = 60 is not a multiple of 8: the kernels take 4-, 2- and 1-element vectors here.
    for dtype in (torch.float32, torch.bfloat16):
        x = _inputs((6, 60), dtype, seed=7, specials=True)
        for mode in ("exact", "floor", "rceil"):
            kw = dict(block=block, rounding=rounding, seed=99, scale_mode=mode)
            assert_same_qtensor(lowbit.quantize(x, fmt, backend="cuda", **kw),
                                lowbit.quantize(x, fmt, backend="ref", **kw), f"{fmt} {block} {mode} {dtype}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape,fmt,block", [  # every (shape, format) whose block divides K
    (shape, fmt, block) for shape in [(1, 16), (3, 48), (128, 4096), (2048, 2048), (7, 32768)]
    for fmt, block in [("nvfp4", (1, 16)), ("mxfp4", (1, 32)), ("mxfp8", (1, 32)), ("fp8_e4m3", None),
                       ("fp8_e4m3", (1, 128)), ("fp8_e4m3", "row")]
    if not (isinstance(block, tuple) and shape[1] % block[1])])
def test_quantize_shapes_bit_exact(shape, fmt, block):
    x = _inputs(shape, torch.bfloat16, seed=3, specials=False)
    for rounding in ("nearest", "stochastic"):
        kw = dict(block=block, rounding=rounding, seed=5)
        assert_same_qtensor(lowbit.quantize(x, fmt, backend="cuda", **kw),
                            lowbit.quantize(x, fmt, backend="ref", **kw), f"{fmt} {block} {shape} {rounding}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("global_amax", [1.0, 0.0, 1e-3, 1e30, math.nan])
@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_nvfp4_global_amax_bit_exact(global_amax, block):
    x = _inputs((64, 128), torch.float32, seed=11, specials=False)
    for rounding in ("nearest", "stochastic"):
        # as a tensor: a non-positive or non-finite Python number is refused
        kw = dict(block=block, rounding=rounding, seed=1, global_amax=torch.tensor(global_amax))
        assert_same_qtensor(lowbit.quantize(x, "nvfp4", backend="cuda", **kw),
                            lowbit.quantize(x, "nvfp4", backend="ref", **kw), f"nvfp4 {block} amax={global_amax}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("hadamard", [16, 32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("fmt,block,global_amax", [
    ("nvfp4", (1, 16), None), ("nvfp4", (1, 16), 7.5), ("nvfp4", (16, 16), None), ("mxfp4", (1, 32), None),
    ("mxfp8", (1, 32), None), ("fp8_e4m3", (1, 128), None), ("fp8_e4m3", None, None), ("fp8_e5m2", "row", None)])
def test_quantize_with_hadamard_bit_exact(hadamard, fmt, block, global_amax):
    # Row blocks with a transform of <= 256 values run it inside the quantize kernel; the other
    # cases transform first. Both must give ref's bits.
    x = _inputs((32, 4096), torch.bfloat16, seed=13, specials=False)
    for rounding in ("nearest", "stochastic"):
        kw = dict(block=block, rounding=rounding, seed=2**40 + 3, hadamard=hadamard, global_amax=global_amax)
        assert_same_qtensor(lowbit.quantize(x, fmt, backend="cuda", **kw),
                            lowbit.quantize(x, fmt, backend="ref", **kw), f"{fmt} {block} hadamard={hadamard}")


def _all_bf16(device=DEV) -> torch.Tensor:
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(device)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cast_bit_exact(dtype, rounding):
    g = torch.Generator(device="cpu").manual_seed(17)
    rnd = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    inputs = [
        _all_bf16().float(),  # every bf16 pattern as fp32: all exponents, zeros, subnormals, Inf, NaN
        rnd.view(torch.float32).to(DEV),  # random fp32 bit patterns
        (torch.randn(1001, generator=g) * 300).to(DEV),  # an odd size: the tail path
        _all_bf16(),  # bf16 input
        _all_bf16().float().to(torch.float16),  # fp16 input
        (torch.randn(3, 5, 7, generator=g) * 1e-3).to(DEV),  # 3-D, odd sizes
    ]
    for x in inputs:
        for seed in (0, 42, 2**62 + 5):
            got = lowbit.cast(x, dtype, rounding=rounding, seed=seed, backend="cuda")
            want = lowbit.cast(x, dtype, rounding=rounding, seed=seed, backend="ref")
            assert_same_bits(got, want, f"cast {x.dtype}{tuple(x.shape)} -> {dtype} {rounding} seed={seed}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("block", [2**k for k in range(4, 16)])
def test_hadamard_bit_exact_every_block(block):
    g = torch.Generator(device="cpu").manual_seed(block)
    rows = max(1, 65536 // block)
    x = torch.randn(rows, 2 * block, generator=g).to(DEV)
    x[0, 0] = math.nan
    if rows > 1:
        x[1, 3] = math.inf
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        for seed in (None, 0, 2**63 - 1):
            for inverse in (False, True):
                got = lowbit.hadamard(xd, block, seed=seed, inverse=inverse, backend="cuda")
                want = lowbit.hadamard(xd, block, seed=seed, inverse=inverse, backend="ref")
                assert_same_bits(got, want, f"hadamard b={block} {dtype} seed={seed} inverse={inverse}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hadamard_axis_bit_exact(axis):
    x = _inputs((32, 64, 128), torch.float32, seed=5, specials=False)
    for block in (16, 32):
        got = lowbit.hadamard(x, block, seed=9, axis=axis, backend="cuda")
        want = lowbit.hadamard(x, block, seed=9, axis=axis, backend="ref")
        assert_same_bits(got, want, f"hadamard axis={axis} b={block}")


@pytest.mark.cuda
@needs_cuda
def test_dequantize_to_other_dtypes_bit_exact():
    x = _inputs((64, 256), torch.float32, seed=21, specials=True)
    for fmt, block in (("nvfp4", (16, 16)), ("mxfp4", None), ("fp8_e5m2", (1, 16)), ("fp8_e4m3", None)):
        q = lowbit.quantize(x, fmt, block=block)
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            assert_same_bits(q.dequantize(dtype, backend="cuda"), q.dequantize(dtype, backend="ref"), f"{fmt} {dtype}")


def _gemm_tolerance(qa: lowbit.QTensor, qb: lowbit.QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """|C - C_ref| bound for two fp32-accumulated evaluations of the same K-term products.

    Each evaluation is within gamma * sum_k |a_k b_k| of the exact sum, gamma = n u / (1 - n u),
    u = 2^-24, n = K + 3 (K - 1 additions, the products, and _scaled_mm's scale multiplications);
    two of them differ by at most twice that. A low-precision output adds one rounding per side.
    """
    A = qa.dequantize(torch.float64, backend="ref")
    B = qb.dequantize(torch.float64, backend="ref")
    n = qa.shape[1] + 3
    u = 2.0**-24
    gamma = n * u / (1 - n * u)
    tol = 2 * gamma * (A.abs() @ B.abs().t())
    if out_dtype != torch.float32:
        eps = torch.finfo(out_dtype).eps
        tol = tol + eps * (A @ B.t()).abs() + torch.finfo(out_dtype).tiny
    return tol


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fmt,block,mnk", [  # 128x128 tiles need every dim divisible by 128
    (fmt, block, mnk) for fmt, block in [("fp8_e4m3", None), ("fp8_e4m3", "row"), ("fp8_e5m2", None),
                                         ("fp8_e4m3", (128, 128)), ("mxfp8", None), ("mxfp4", None),
                                         ("nvfp4", (1, 16)), ("nvfp4", (16, 16))]
    for mnk in [(128, 256, 512), (64, 32, 4096)] if not (block == (128, 128) and any(d % 128 for d in mnk))])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_within_accumulation_order_tolerance(fmt, block, out_dtype, mnk):
    M, N, K = mnk
    g = torch.Generator(device="cpu").manual_seed(M + N + K)
    a = torch.randn(M, K, generator=g).to(DEV)
    b = torch.randn(N, K, generator=g).to(DEV)
    qa = lowbit.quantize(a, fmt, block=block)
    qb = lowbit.quantize(b, fmt, block=block)
    got = lowbit.qmatmul(qa, qb, out_dtype=out_dtype, backend="cuda")
    want = lowbit.qmatmul(qa, qb, out_dtype=out_dtype, backend="ref")
    assert got.dtype == want.dtype == out_dtype and got.shape == (M, N)
    diff = (got.double() - want.double()).abs()
    tol = _gemm_tolerance(qa, qb, out_dtype)
    assert bool((diff <= tol).all()), f"max excess {float((diff - tol).max())}"


@pytest.mark.cuda
@needs_cuda
def test_auto_backend_on_cuda_tensors_is_cuda():
    assert backends.resolve("quantize", "cuda") == "cuda"
    x = _inputs((16, 64), torch.float32, seed=1, specials=False)
    assert_same_qtensor(lowbit.quantize(x, "nvfp4"), lowbit.quantize(x, "nvfp4", backend="ref"), "auto")


@pytest.mark.cuda
@needs_cuda
def test_bad_arguments_raise_instead_of_crashing():
    from lowbit.backends import codes
    from lowbit.backends import cuda as cb
    from lowbit.formats import MXFP8, NVFP4

    x = torch.randn(4, 32, device=DEV)
    with pytest.raises(RuntimeError, match="block"):
        cb.quantize(x, MXFP8, (1, 16), "nearest", 0, "floor", None, 0, 1)
    with pytest.raises(RuntimeError, match="rounding"):
        cb.quantize(x, NVFP4, (1, 16), "up", 0, "exact", None, 0, 1)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cb.cast(torch.randn(4), torch.bfloat16, "nearest", 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cb._C.hadamard(torch.ones(2, 16, dtype=torch.int32, device=DEV), 16, None, False)
    with pytest.raises(RuntimeError, match="power of two"):
        cb.hadamard(x, 24, None, False)
    with pytest.raises(RuntimeError, match="2-D"):
        cb._C.quantize(torch.randn(2, 2, 32, device=DEV), codes.KIND["mx"], codes.ELEM["e4m3"], 1, 32,
                       codes.ROUNDING["nearest"], 0, codes.SCALE_MODE["floor"], None, 0, 1)
    with pytest.raises(RuntimeError, match="^rounding: "):  # a code out of range: an error, never a crash
        cb._C.quantize(x, codes.KIND["mx"], codes.ELEM["e4m3"], 1, 32, 2, 0, codes.SCALE_MODE["floor"], None, 0, 1)
    # A non-contiguous, misaligned input is copied, never read out of bounds.
    big = torch.randn(5, 33, device=DEV)[:, 1:]
    assert_same_bits(cb.cast(big, torch.bfloat16, "nearest", 0), lowbit.cast(big, torch.bfloat16, backend="ref"))
