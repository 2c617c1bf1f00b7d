"""The Triton backend against the reference backend (the spec), bit for bit: atol=0 everywhere
except the GEMM's fp32 sums (their derived bound is in test_triton_gemm.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET once, when it is imported (its own library functions, tl.max or tl.philox, are
built then), so this module sets it before importing triton. If something in the same process
imported triton earlier without it, the interpreter cannot be switched on any more and the module
is skipped with that reason (run it on its own, or export TRITON_INTERPRET=1). Shapes are tiny
because the interpreter runs every program through numpy.
"""
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_IMPORTED_BEFORE = "triton" in sys.modules

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

if INTERPRETED and _IMPORTED_BEFORE and type(tl.max).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported in this process before TRITON_INTERPRET=1 was set, so its kernels cannot "
                "run in the interpreter here; run this file on its own or export TRITON_INTERPRET=1",
                allow_module_level=True)

import lowbit  # noqa: E402
from lowbit import backends  # noqa: E402
from lowbit.backends import ref  # noqa: E402
from lowbit.backends import triton as tb  # noqa: E402
from lowbit.backends.triton._rounding import fdiv_rn, hadamard_negative, random_bits  # noqa: E402

DEV = "cpu" if INTERPRETED else "cuda"
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

# numpy warns when the interpreter multiplies Inf or NaN (special-value tests do so on purpose)
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def assert_same_bits(ours: torch.Tensor, spec: torch.Tensor, what: str) -> None:
    assert ours.dtype == spec.dtype and ours.shape == spec.shape, f"{what}: {ours.dtype}{tuple(ours.shape)} " \
        f"vs {spec.dtype}{tuple(spec.shape)}"
    diff = bits(ours).cpu() != bits(spec).cpu()
    assert not bool(diff.any()), f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at " \
        f"{diff.nonzero()[0].tolist()}"


def assert_same_values(ours: torch.Tensor, spec: torch.Tensor, what: str) -> None:
    """Bit-equal, except that a NaN may carry any sign or payload (its bits depend on the device)."""
    assert ours.dtype == spec.dtype and ours.shape == spec.shape, what
    o, s = ours.cpu(), spec.cpu()
    diff = (bits(o) != bits(s)) & ~(torch.isnan(o) & torch.isnan(s))
    assert not bool(diff.any()), f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at " \
        f"{diff.nonzero()[0].tolist()}"


# ----------------------------------------------------------------------------- contract
def test_registry_serves_every_op_here():
    assert tb.unavailable() is None
    assert "cuda" in tb.devices() and ("cpu" in tb.devices()) == INTERPRETED
    for op in backends.OPS:
        assert backends.why_unavailable("triton", op, DEV) is None
    # the automatic choice on CPU never lands on the interpreter
    assert backends.resolve("quantize", "cpu") != "triton"


def test_missing_triton_is_a_reason_not_an_import_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lowbit\n"
            "from lowbit import backends\n"
            "r = backends.why_unavailable('triton', 'quantize', 'cuda')\n"
            "assert r and 'triton' in r, r\n"
            "assert backends.resolve('quantize', 'cuda') != 'triton'\n"
            "print(r)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "triton is not importable" in res.stdout


def test_outputs_are_new_tensors():
    x = torch.randn(4, 32, device=DEV)
    for out in (tb.hadamard(x, 16, 3, False), tb.dequantize(*tb.quantize(x, lowbit.MXFP8, (1, 32), "nearest", 0,
                                                                        "floor", None, 0, 1),
                                                         lowbit.MXFP8, (1, 32), 32, torch.float32),
                tb.cast(x, torch.float16, "nearest", 0)):
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


_COMPILE_SCRIPT = r"""
import re, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lowbit.backends.triton import _amax, _cast, _dequantize, _hadamard, _quantize

P32, PI, PU8, PI16 = "*fp32", "*i32", "*u8", "*i16"
E4M3, E2M1 = (3, 7, 0x7E, 0x7E, 0x7F, 7), (1, 1, 7, 7, 0, 3)
CODE = ("MBITS", "BIAS", "MAX_CODE", "INF_CODE", "NAN_CODE", "SIGN_SHIFT")
KERNELS = [
    (_cast._cast_kernel, dict(x_ptr=P32, out_ptr=PU8, n="i32", seed="i64"),
     dict(STOCHASTIC=True, **dict(zip(CODE, E4M3)), WIDE=False, BF16=False, BLOCK=1024)),
    (_hadamard._hadamard_pass, dict(x_ptr=PI16, y_ptr=P32, n_lines="i32", seed="i64", norm="fp32"),
     dict(MID=256, LOG_MID=8, LOW=1, BLOCK=256, LINES=16, SIGNS_FIRST=True, SIGNS_LAST=False, NORM=True, BF16=True)),
    (_hadamard._hadamard_pass, dict(x_ptr=P32, y_ptr=P32, n_lines="i32", seed="i64", norm="fp32"),
     dict(MID=128, LOG_MID=7, LOW=256, BLOCK=32768, LINES=32, SIGNS_FIRST=False, SIGNS_LAST=True, NORM=True, BF16=False)),
    (_amax._amax_tiles_kernel, dict(x_ptr=P32, amax_ptr=PI, R="i32", K="i32", nbr="i32", nbk="i32", n_blocks="i32"),
     dict(BR=16, BK=16, NR=2, NK=8, TOTAL=True, BF16=False)),
    (_amax._amax_slab_kernel, dict(x_ptr=P32, amax_ptr=PI, R="i32", K="i32", br="i32", bk="i32", nbk="i32",
                                   n_blocks="i32"), dict(TR=16, TK=256, TOTAL=True, BF16=False)),
] + [
    (_quantize._scale_kernel, dict(amax_ptr=PI, gamax_ptr=P32, scale_ptr=P32 if kind == 0 else PU8, factor_ptr=P32,
                                   gs_ptr=P32, n_blocks="i32"),
     dict(KIND=kind, MODE=mode, ELEM_MAX=448.0, EMAX=8, HAS_GLOBAL=kind == 2, LANES=256))
    for kind, mode in ((0, 2), (1, 2), (2, 0))
] + [
    (_quantize._encode_kernel, dict(v_ptr=P32, factor_ptr=P32, gs_ptr=P32, out_ptr=PU8, R="i32", K="i32", br="i32",
                                    bk="i32", nbk="i32", inner="i32", seed="i64"),
     dict(KIND=kind, STOCHASTIC=True, **dict(zip(CODE, elem)), PACKED=elem == E2M1, BF16=False, TR=16, TK=128))
    for kind, elem in ((0, E4M3), (1, E2M1), (2, E2M1))
] + [
    (_dequantize._dequantize_kernel, dict(data_ptr=PU8, scale_ptr=PU8, gs_ptr=P32, out_ptr=P32, R="i32", K="i32",
                                          br="i32", bk="i32", nbk="i32"),
     dict(KIND=2, EBITS=2, MBITS=1, BIAS=1, PACKED=True, TR=16, TK=128)),
]
bad = []
for fn, args, consts in KERNELS:
    sig = dict(args, **{k: "constexpr" for k in consts})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"enable_fp_fusion": False})
    ptx = kernel.asm["ptx"]
    for pattern in (r"\.ftz\b", r"\bdiv\.(full|approx)", r"\bfma\.", r"\b(ld|st)\.local\b"):
        if re.search(pattern, ptx):
            bad.append(f"{fn.__name__}: {pattern}")
print("compiled", len(KERNELS))
sys.exit("; ".join(bad) if bad else 0)
"""


@pytest.mark.slow
def test_kernels_compile_for_cuda_with_ieee_arithmetic():
    """Every kernel compiles to sm_90 PTX (no GPU needed) with no flush-to-zero, approximate division,
    fused multiply-add or register spills: the interpreter accepts code the CUDA compiler does not."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-1000:]
    assert "compiled" in res.stdout


# ----------------------------------------------------------------------------- random bits
@triton.jit
def _bits_kernel(idx_ptr, out_ptr, n, seed, SIGNS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    i = tl.load(idx_ptr + offs, mask=mask, other=0)
    if SIGNS:
        w = hadamard_negative(seed, i).to(tl.int64)
    else:
        w = random_bits(seed, i).to(tl.int64)
    tl.store(out_ptr + offs, w, mask=mask)


def _kernel_bits(seed: int, index: torch.Tensor, signs: bool = False) -> torch.Tensor:
    index = index.to(device=DEV, dtype=torch.int64).contiguous()
    out = torch.empty_like(index)
    _bits_kernel[(triton.cdiv(index.numel(), 1024),)](index, out, index.numel(), seed, signs, 1024)
    return out.cpu()


def test_philox_known_answer():
    # Philox4x32-10, counter 0 and key 0 (Salmon et al., SC'11 known-answer vector)
    assert _kernel_bits(0, torch.arange(4)).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 1, 0x1234_5678_9ABC, 2**63 - 1])
def test_rounding_bits_match_ref(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    index = torch.cat([torch.arange(64), torch.randint(0, 2**40, (512,), generator=g),
                       torch.tensor([2**32 - 1, 2**32, 2**34 - 1, 2**34, 2**34 + 5, 2**40 + 3])])
    assert torch.equal(_kernel_bits(seed, index), ref.random_bits(seed, index))


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_hadamard_sign_stream_matches_ref(seed):
    j = torch.arange(4096)
    negative = _kernel_bits(seed, j, signs=True) != 0
    assert torch.equal(negative, ref.hadamard_signs(4096, seed) < 0)


@triton.jit
def _div_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = fdiv_rn(tl.load(x_ptr + offs, mask=mask, other=1.0), tl.load(y_ptr + offs, mask=mask, other=1.0))
    tl.store(out_ptr + offs, q, mask=mask)


def test_integer_division_is_ieee_division():
    """fdiv_rn (every quotient the kernels take) against the CPU's IEEE fp32 division, subnormals included."""
    g = torch.Generator().manual_seed(4)
    n = 8192
    patterns = torch.randint(-2**31, 2**31, (2, n), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    spread = torch.randn(2, n, generator=g) * torch.pow(2.0, torch.randint(-149, 128, (2, n), generator=g).float())
    near = torch.randn(2, n, generator=g) * torch.pow(2.0, torch.randint(-20, 20, (2, n), generator=g).float())
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-149, 2.0**-126 - 2.0**-149, 2.0**-126,
                            3.4028234663852886e38, 1.0, 3.0, 6.0, 448.0, 2688.0])
    sx, sy = torch.meshgrid(special, special, indexing="ij")
    x = torch.cat([patterns[0], spread[0], near[0], sx.flatten(), near[0] * 2.0**-120])
    y = torch.cat([patterns[1], spread[1], near[1], sy.flatten(), near[1]])
    out = torch.empty_like(x, device=DEV)
    _div_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(DEV), y.to(DEV), out, x.numel(), 1024)
    assert_same_values(out.cpu(), x / y, "x / y")


# ----------------------------------------------------------------------------- cast
CAST_DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


def _all_bf16() -> torch.Tensor:
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)


def _fp32_specials() -> torch.Tensor:
    """Every special class of fp32 and the ties / saturation edges of each target, both signs."""
    f = [0.0, 2.0**-149, 3 * 2.0**-149, 2.0**-126 - 2.0**-149, 2.0**-126, 1.0, 3.4028234663852886e38,
         math.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 2**-4, 1.0 + 3 * 2**-4, 1.0 + 2**-3,
         464.0, 480.0, 448.0, 447.99997, 57344.0, 61440.0, 61439.996, 65504.0, 65520.0, 65519.996,
         3.3895313892515355e38, 3.3961775292304e38, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 2.0**-16, 2.0**-17,
         2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-133, 2.0**-134, 1e-45, 0.1, 1.0 / 3]
    x = torch.tensor(f, dtype=torch.float32)
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF], dtype=torch.int64).to(torch.int32)
    return torch.cat([x, -x, nans.view(torch.float32)])


def _fp32_random(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    small = torch.randn(n, generator=g) * torch.pow(2.0, torch.randint(-30, 20, (n,), generator=g).float())
    return torch.cat([patterns, small])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_cast_every_bf16_pattern(dtype, rounding):
    x = _all_bf16()
    ours = lowbit.cast(x.to(DEV), dtype, rounding=rounding, seed=11, backend="triton")
    assert_same_bits(ours, ref.cast(x.float(), dtype, rounding, 11), f"{dtype}")  # what lowbit.cast hands ref


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_cast_fp32_specials_and_random_patterns(dtype, rounding):
    x = torch.cat([_fp32_specials(), _fp32_random(2048, 5)]).reshape(-1, 2)
    for seed in (0, 2**40 + 9):
        ours = lowbit.cast(x.to(DEV), dtype, rounding=rounding, seed=seed, backend="triton")
        assert_same_bits(ours, lowbit.cast(x, dtype, rounding=rounding, seed=seed, backend="ref"), f"seed {seed}")


def test_cast_from_half_inputs_through_the_backend():
    x = _fp32_random(1024, 3)
    for src in (torch.bfloat16, torch.float16):
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            xs = x.to(src)
            assert_same_bits(tb.cast(xs.to(DEV), dtype, "stochastic", 5), ref.cast(xs, dtype, "stochastic", 5),
                             f"{src}->{dtype}")


# ----------------------------------------------------------------------------- quantize / dequantize
R1, R2, K = 2, 16, 64
R = R1 * R2


def _matrix(seed: int) -> torch.Tensor:
    """[R, K] fp32 with magnitudes spread over 2^+-14, a zero row, signed zeros, subnormals, tiny rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g) * torch.pow(2.0, torch.randint(-14, 14, (R, 1), generator=g).float())
    x = x * torch.pow(2.0, torch.randint(-3, 4, (1, K), generator=g).float())
    x[1] = 0.0
    x[2, ::2] = -0.0
    x[3] = torch.randn(K, generator=g) * 1e-39  # fp32 subnormals
    x[4] = torch.randn(K, generator=g) * 1e-37  # FP8 scale below 2^-126
    x[5, 7] = 2.0**-149
    return x


def _arrange(x2: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor whose [R, K] working view along `axis` is x2 (axis 0: 3-D, inner = R)."""
    if axis == -1:
        return x2.reshape(R1, R2, K).contiguous()
    return x2.reshape(R1, R2, K).movedim(-1, 0).contiguous()


def _check_quantize(x, fmt, *, what, dequant_dtype=torch.float32, **kw):
    ours = lowbit.quantize(x.to(DEV), fmt, backend="triton", **kw)
    spec = lowbit.quantize(x, fmt, backend="ref", **kw)
    assert_same_bits(ours.data, spec.data, f"{what}: data")
    assert_same_bits(ours.scale, spec.scale, f"{what}: scale")
    if spec.global_scale is not None:
        assert_same_bits(ours.global_scale, spec.global_scale, f"{what}: global scale")
    assert_same_values(lowbit.dequantize(ours, dequant_dtype, backend="triton"),
                       lowbit.dequantize(spec, dequant_dtype, backend="ref"), f"{what}: dequantize")


def _cases():
    fp8 = [(f, b, "exact") for f in ("fp8_e4m3", "fp8_e5m2") for b in (None, "row", (1, 16), (16, 16))]
    fp8 += [(f, b, m) for f in ("fp8_e4m3", "fp8_e5m2") for b in (None, (1, 16)) for m in ("floor", "rceil")]
    mx = [(f, (1, 32), m) for f in ("mxfp8", "mxfp8_e5m2", "mxfp4") for m in ("floor", "rceil")]
    nv = [("nvfp4", b, "exact") for b in ((1, 16), (16, 16))]
    out = []
    for (fmt, block, mode), rounding, had, axis in itertools.product(fp8 + mx + nv, ("nearest", "stochastic"),
                                                                     (None, 16), (-1, 0)):
        out.append(pytest.param(fmt, block, mode, rounding, had, axis,
                                id=f"{fmt}-{block}-{mode}-{rounding}-had{had}-axis{axis}".replace(" ", "")))
    return out


@pytest.mark.parametrize("fmt,block,mode,rounding,had,axis", _cases())
def test_quantize_matches_ref(fmt, block, mode, rounding, had, axis):
    x = _arrange(_matrix(len(fmt) + (had or 0)), axis)
    _check_quantize(x, fmt, what=fmt, block=block, axis=axis, rounding=rounding, seed=2**33 + 17,
                    scale_mode=mode, hadamard=had)


@pytest.mark.parametrize("fmt,block", [("fp8_e4m3", (1, 16)), ("mxfp8", (1, 32)), ("mxfp4", (1, 32)),
                                       ("nvfp4", (1, 16)), ("nvfp4", (16, 16))])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16], ids=str)
def test_quantize_half_inputs_and_half_dequantize(fmt, block, src):
    x = _arrange(_matrix(3), -1).clamp(-60000, 60000).to(src)
    _check_quantize(x, fmt, what=f"{fmt} from {src}", block=block, rounding="stochastic", seed=4,
                    hadamard=16, dequant_dtype=src)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("global_amax", [0.0, 1e-3, 3.0, 1e30, math.inf])
def test_nvfp4_global_amax_matches_ref(global_amax, rounding):
    # below the true amax: block scales saturate at 448 and elements at 6; 0: s_enc = 1; Inf: s_enc = 0
    x = _arrange(_matrix(9), -1)
    for block in ((1, 16), (16, 16)):
        # as a tensor: a non-positive or non-finite Python number is refused
        _check_quantize(x, "nvfp4", what=f"global_amax {global_amax} {block}", block=block, rounding=rounding,
                        seed=1, global_amax=torch.tensor(global_amax))


def _special_matrix() -> torch.Tensor:
    x = _matrix(21)
    x[0, 3] = math.nan
    x[6, 40] = math.inf
    x[7, 20] = -math.inf
    x[8, :16] = 3.4028234663852886e38
    x[9, 16:48] = -3.4028234663852886e38
    x[10, 0] = 2.0**-149
    x[11, :] = torch.tensor([0.0, -0.0] * (K // 2))
    return x


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt,block,mode", [
    ("fp8_e4m3", None, "exact"), ("fp8_e4m3", (1, 16), "exact"), ("fp8_e4m3", (16, 16), "floor"),
    ("fp8_e5m2", (1, 16), "exact"), ("fp8_e5m2", "row", "rceil"), ("mxfp8", (1, 32), "floor"),
    ("mxfp8", (1, 32), "rceil"), ("mxfp8_e5m2", (1, 32), "floor"), ("mxfp4", (1, 32), "floor"),
    ("mxfp4", (1, 32), "rceil"), ("nvfp4", (1, 16), "exact"), ("nvfp4", (16, 16), "exact")])
def test_special_values_match_ref(fmt, block, mode, rounding):
    """NaN / Inf blocks (NaN scale, NaN or zero codes), FLT_MAX blocks, zero blocks, subnormals."""
    x2 = _special_matrix()
    for axis in (-1, 0):
        _check_quantize(_arrange(x2, axis), fmt, what=f"{fmt} axis {axis}", block=block, axis=axis,
                        rounding=rounding, seed=3, scale_mode=mode)
    _check_quantize(_arrange(x2, -1), fmt, what=f"{fmt} hadamard", block=block, rounding=rounding, seed=3,
                    scale_mode=mode, hadamard=32)
    if fmt == "nvfp4":
        finite = torch.nan_to_num(x2, nan=0.0, posinf=0.0, neginf=0.0)
        _check_quantize(_arrange(finite, -1), fmt, what="nvfp4 FLT_MAX amax", block=block, rounding=rounding,
                        seed=3)


@pytest.mark.parametrize("fmt,block", [("fp8_e4m3", (1, 128)), ("fp8_e4m3", (128, 128)), ("fp8_e5m2", None),
                                       ("mxfp4", (1, 32)), ("nvfp4", (16, 16))])
def test_production_block_shapes(fmt, block):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(128, 256, generator=g) * torch.logspace(-2, 2, 256)
    _check_quantize(x, fmt, what=f"{fmt} {block}", block=block, rounding="stochastic", seed=2**62 + 1,
                    hadamard=128)


def test_odd_sized_fp8_blocks_match_ref():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 10, 20, generator=g)
    for block, axis in ((None, -1), ("row", -1), ((1, 5), -1), ((2, 2), 1), ("row", 0)):
        _check_quantize(x, "fp8_e4m3", what=f"{block} axis {axis}", block=block, axis=axis, rounding="stochastic",
                        seed=5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp8_e5m2", "mxfp4", "nvfp4"])
def test_dequantize_every_code_and_scale_byte(fmt):
    """Row r holds every storage byte (rotated by r) and, for MX / NVFP4, scale byte r (NaN ones too)."""
    f = lowbit.formats.get_format(fmt)
    bk = 16 if f.kind == "nvfp4" else 32
    width = bk // 2 if f.packed else bk
    r = torch.arange(256).unsqueeze(1)
    data = ((r * 7 + torch.arange(width).unsqueeze(0) * 37) % 256).to(torch.uint8)
    if f.kind == "fp8":
        data = torch.cat([data, torch.arange(256, dtype=torch.uint8).reshape(8, 32)])
        scale = torch.tensor([1.0, 2.0**-126, 3.5, 448.0, 1e30, math.nan, 0.1, 2.0**-20]).repeat(33)[:264]
        scale = scale.reshape(264, 1)
    elif f.kind == "mx":
        scale = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    else:
        scale = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(256, 1)
    if not f.packed:
        data = data.view(f.elem.torch_dtype)
    block = (1, bk)
    for gs in (1.0, 2688.0 / 3.0, 3.4028234663852886e38):
        g = torch.tensor(gs)
        for dtype in (torch.float32, torch.bfloat16):
            ours = tb.dequantize(data.to(DEV), scale.to(DEV), g.to(DEV), f, block, bk, dtype)
            assert_same_values(ours, ref.dequantize(data, scale, g, f, block, bk, dtype), f"gs {gs} {dtype}")


# ----------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("block,shape,axis", [(16, (3, 5, 48), -1), (16, (32, 3, 2), 0), (32, (4, 64), -1),
                                              (32, (2, 64, 3), 1), (512, (2, 1024), -1), (32768, (1, 32768), -1)])
def test_hadamard_matches_ref(block, shape, axis):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(shape, generator=g) * 100
    x.view(-1)[5] = math.nan
    x.view(-1)[x.numel() // 2 + 1] = math.inf
    x.view(-1)[2] = 2.0**-149
    for seed, inverse in itertools.product((None, 7, 2**40 + 3), (False, True)):
        ours = lowbit.hadamard(x.to(DEV), block, seed=seed, axis=axis, inverse=inverse, backend="triton")
        spec = lowbit.hadamard(x, block, seed=seed, axis=axis, inverse=inverse, backend="ref")
        assert_same_values(ours, spec, f"seed {seed} inverse {inverse}")


def test_hadamard_other_input_dtypes_and_round_trip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 256, generator=g)
    x[0, :4] = torch.tensor([1e-39, -1e-41, 0.0, math.inf])
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        xs = x.to(dtype)
        if dtype == torch.float64:
            xs[1, :3] = torch.tensor([1e-300, -1e300, 1.0 + 2.0**-40], dtype=torch.float64)
        assert_same_values(lowbit.hadamard(xs.to(DEV), 64, seed=3, backend="triton"),
                           lowbit.hadamard(xs, 64, seed=3, backend="ref"), str(dtype))
    x = torch.randn(8, 256, generator=g)
    y = tb.hadamard(x.to(DEV), 256, 9, False)
    back = tb.hadamard(y, 256, 9, True).cpu()
    assert_same_values(back, ref.hadamard(ref.hadamard(x, 256, 9, False), 256, 9, True), "round trip")
    assert torch.allclose(back, x, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- qmatmul
@pytest.mark.parametrize("fa,ba,fb,bb", [("fp8_e4m3", None, "fp8_e5m2", "row"), ("mxfp8", None, "mxfp8", None),
                                         ("mxfp4", None, "mxfp4", None), ("nvfp4", (1, 16), "nvfp4", (16, 16))])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qmatmul_matches_ref(fa, ba, fb, bb, out_dtype):
    """Same quantized operands bit for bit; the GEMM sums in another order, so within its fp32 bound."""
    from test_triton_gemm import check_gemm

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 64, generator=g).to(DEV), torch.randn(32, 64, generator=g).to(DEV)
    q = {name: (lowbit.quantize(a, fa, block=ba, rounding="stochastic", seed=1, backend=name).parts(),
                lowbit.quantize(b, fb, block=bb, rounding="stochastic", seed=2, backend=name).parts())
         for name in ("triton", "ref")}
    for ours, spec in zip(q["triton"], q["ref"]):
        for field in ("data", "scale", "global_scale"):
            assert_same_bits(getattr(ours, field), getattr(spec, field), f"{fa} x {fb} {field}")
    check_gemm(*q["triton"], out_dtype)
