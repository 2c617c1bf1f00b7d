"""The C++ CPU backend (lowbit._C) against the reference backend (the spec), bit for bit: atol=0.

Every comparison is on raw bytes: codes, scales and global scales must be identical. NaN has
no single bit pattern in fp32 results (hadamard, dequantize), so there both sides must hold
NaN at the same places and equal bits everywhere else.
"""
import importlib
import itertools
import math

import pytest
import torch

import lowbit
from lowbit import backends
from lowbit.backends import codes
from lowbit.formats import FORMATS

reason = backends.why_unavailable("cpu", "quantize", "cpu")
if reason:
    pytest.skip(f"cpu backend unavailable: {reason}", allow_module_level=True)

from lowbit import _C  # noqa: E402

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def assert_same_bits(ours: torch.Tensor, spec: torch.Tensor, what: str) -> None:
    assert ours.dtype == spec.dtype and ours.shape == spec.shape, \
        f"{what}: {ours.dtype}{tuple(ours.shape)} vs spec {spec.dtype}{tuple(spec.shape)}"
    diff = bits(ours) != bits(spec)
    if diff.any():
        i = diff.flatten().nonzero()[0].item()
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} differ; first at flat {i}: "
                             f"{bits(ours).flatten()[i].item():#x} vs spec {bits(spec).flatten()[i].item():#x}")


def assert_same_values(ours: torch.Tensor, spec: torch.Tensor, what: str) -> None:
    """Bit-exact, except that any NaN matches any NaN."""
    assert ours.dtype == spec.dtype and ours.shape == spec.shape
    nan_o, nan_s = torch.isnan(ours), torch.isnan(spec)
    assert torch.equal(nan_o, nan_s), f"{what}: NaN at different places"
    assert_same_bits(torch.where(nan_o, 0, ours), torch.where(nan_s, 0, spec), what)


def assert_same_q(x, fmt, what, **kw):
    spec = lowbit.quantize(x, fmt, backend="ref", **kw)
    ours = lowbit.quantize(x, fmt, backend="cpu", **kw)
    assert_same_bits(ours.data, spec.data, f"{what} data")
    assert_same_bits(ours.scale, spec.scale, f"{what} scale")
    if spec.global_scale is not None:
        assert_same_bits(ours.global_scale, spec.global_scale, f"{what} global_scale")
    return ours


def varied(shape, seed=0, dtype=torch.float32):
    """Normal data whose magnitude changes by powers of two from row to row and column to column,
    so blocks get different scales, with a few exact zeros and ties on coarse grids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.exp2(torch.randint(-8, 9, shape[:-1] + (1,), generator=g).float())
    x = x * torch.exp2(torch.randint(-3, 4, (shape[-1],), generator=g).float())
    x.view(-1)[::37] = 0.0
    x.view(-1)[5::41] = torch.round(x.view(-1)[5::41] * 4) / 4  # values on coarse grids: ties after scaling
    return x.to(dtype)


# (format, block) pairs: every block option of every format
FORMAT_BLOCKS = [
    ("fp8_e4m3", None), ("fp8_e4m3", "row"), ("fp8_e4m3", (1, 32)), ("fp8_e4m3", (16, 16)),
    ("fp8_e5m2", None), ("fp8_e5m2", "row"), ("fp8_e5m2", (1, 16)), ("fp8_e5m2", (32, 32)),
    ("mxfp8", (1, 32)), ("mxfp8_e5m2", (1, 32)), ("mxfp4", (1, 32)),
    ("nvfp4", (1, 16)), ("nvfp4", (16, 16)),
]
# (shape, axis): 2-D along either axis, 3-D with elements after the axis (inner != 1)
LAYOUTS = [((32, 64), -1), ((64, 32), 0), ((4, 64, 8), 1), ((2, 16, 64), -1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("fmt,block", FORMAT_BLOCKS, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("hadamard", [None, 32])
@pytest.mark.parametrize("layout,dtype", [(layout, torch.float32) for layout in LAYOUTS]
                         + [(LAYOUTS[0], torch.bfloat16), (LAYOUTS[2], torch.bfloat16),
                            (LAYOUTS[1], torch.float16), (LAYOUTS[3], torch.float16)],
                         ids=lambda v: f"{v[0]}ax{v[1]}".replace(" ", "") if isinstance(v, tuple) else str(v))
def test_quantize_matches_ref(fmt, block, rounding, hadamard, layout, dtype):
    shape, axis = layout
    x = varied(shape, seed=len(shape) * 7 + axis, dtype=dtype)
    assert_same_q(x, fmt, f"{fmt} {block} {rounding} h={hadamard}", block=block, axis=axis, rounding=rounding,
                  seed=1234567, hadamard=hadamard)


@pytest.mark.parametrize("fmt,block,scale_mode", [
    ("fp8_e4m3", None, "floor"), ("fp8_e4m3", "row", "rceil"), ("fp8_e5m2", (1, 32), "floor"),
    ("fp8_e5m2", (16, 16), "rceil"), ("mxfp8", None, "rceil"), ("mxfp8_e5m2", None, "rceil"), ("mxfp4", None, "rceil"),
])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_scale_modes_match_ref(fmt, block, scale_mode, rounding):
    for dtype in DTYPES:
        x = varied((32, 64), seed=3, dtype=dtype)
        assert_same_q(x, fmt, f"{fmt} {scale_mode}", block=block, rounding=rounding, seed=99, scale_mode=scale_mode)


def special_tensor(dtype):
    """[32, 64] holding NaN, +-Inf, +-0, subnormals, max finite, near-max values, all-zero blocks."""
    x = varied((32, 64), seed=11).to(torch.float32)
    info = torch.finfo(dtype)
    x[0, 0] = math.nan
    x[1, 3] = math.inf
    x[2, 40] = -math.inf
    x[3, :] = 0.0
    x[4, :] = -0.0
    x[5, :32] = 0.0
    x[5, 32:48] = -0.0
    x[6, :] = info.tiny * torch.linspace(-1, 1, 64)  # subnormals of the input dtype
    x[7, :] = info.max * torch.linspace(-1, 1, 64)
    x[8, :] = torch.tensor([448.0, 464.0, 480.0, 57344.0, 61440.0, 65504.0, 6.0, 5.0] * 8)
    x[9, :] = torch.tensor([2.0**-6, 2.0**-9, 2.0**-10, 2.0**-14, 2.0**-16, 2.0**-17, 0.25, 0.75] * 8) \
        * torch.tensor([1.0, -1.0]).repeat(32)
    x[10, :16] = math.inf
    x[11, :] = -1e-3
    x[12, 16:32] = math.nan
    if dtype == torch.float32:
        x[13, :] = 1e-45 * torch.arange(64)  # fp32 subnormals
        x[14, :] = 3.4028234663852886e38
    return x.to(dtype)


@pytest.mark.parametrize("fmt,block", FORMAT_BLOCKS, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_match_ref(fmt, block, rounding, dtype):
    x = special_tensor(dtype)
    assert_same_q(x, fmt, "special", block=block, rounding=rounding, seed=5)
    finite = torch.cat([x[16:], -x[16:]])  # rows 16.. hold no NaN or Inf: scales stay finite
    assert_same_q(finite, fmt, "finite rows", block=block, rounding=rounding, seed=5)
    assert_same_q(x, fmt, "special h16", block=block, rounding=rounding, seed=5, hadamard=16)


@pytest.mark.parametrize("global_amax", [1e38, math.inf, 1e-40, 0.0, -0.0, 1e-3, 0.5, math.nan, 3.4028234663852886e38])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_nvfp4_global_amax_matches_ref(global_amax, rounding, block):
    x = varied((32, 64), seed=17)
    global_amax = torch.tensor(global_amax)  # as a tensor: a non-positive or non-finite Python number is refused
    assert_same_q(x, "nvfp4", f"global_amax={global_amax}", block=block, rounding=rounding, seed=8,
                  global_amax=global_amax)
    assert_same_q(x, "nvfp4", f"global_amax={global_amax} h", block=block, rounding=rounding, seed=8,
                  global_amax=global_amax, hadamard=32)


def test_backend_negative_global_amax_matches_ref():
    """lowbit.quantize rejects a negative global_amax; the backends still agree on what it computes."""
    from lowbit.backends import cpu, ref

    x = varied((32, 64), seed=17)
    for block, rounding in itertools.product([(1, 16), (16, 16)], ["nearest", "stochastic"]):
        args = (FORMATS["nvfp4"], block, rounding, 8, "exact", torch.tensor(-2.0), 0, 1)
        for ours, spec, what in zip(cpu.quantize(x, *args), ref.quantize(x, *args), ("data", "scale", "global_scale")):
            assert_same_bits(ours, spec, f"negative global_amax {what}")


def test_all_zero_tensor_matches_ref():
    for (fmt, block), rounding in itertools.product(FORMAT_BLOCKS, ["nearest", "stochastic"]):
        assert_same_q(torch.zeros(32, 64), fmt, f"zeros {fmt} {block}", block=block, rounding=rounding)
        assert_same_q(-torch.zeros(32, 64, dtype=torch.bfloat16), fmt, "-zeros", block=block, rounding=rounding)


def test_seed_above_32_bits_matches_ref():
    x = varied((16, 64), seed=2)
    for fmt, block in FORMAT_BLOCKS:
        if block in (None, "row") or block[0] == 1:
            assert_same_q(x, fmt, "big seed", block=block, rounding="stochastic", seed=(1 << 62) + 12345)
    for dtype in lowbit.formats.ELEMENT_OF_DTYPE:
        spec = lowbit.cast(x, dtype, rounding="stochastic", seed=(1 << 40) + 3, backend="ref")
        assert_same_bits(lowbit.cast(x, dtype, rounding="stochastic", seed=(1 << 40) + 3, backend="cpu"), spec, "cast")


# ----------------------------------------------------------------------------------- cast
CAST_DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cast_all_bf16_patterns(dtype, rounding):
    x = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    for seed in (0, 77):
        spec = lowbit.cast(x, dtype, rounding=rounding, seed=seed, backend="ref")
        assert_same_bits(lowbit.cast(x, dtype, rounding=rounding, seed=seed, backend="cpu"), spec, f"cast {dtype}")


@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cast_random_fp32_patterns(dtype, rounding):
    g = torch.Generator().manual_seed(21)
    x = torch.randint(-(1 << 31), 1 << 31, (1 << 17,), generator=g, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32).reshape(256, 512)
    spec = lowbit.cast(x, dtype, rounding=rounding, seed=4, backend="ref")
    assert_same_bits(lowbit.cast(x, dtype, rounding=rounding, seed=4, backend="cpu"), spec, f"cast {dtype}")
    # fp32 values near each element grid (exact ties and their neighbours), both signs
    near = (varied((64, 64), seed=5) * 1e-2).view(torch.int32)
    near = torch.cat([near, near & ~0xFFFF, (near & ~0xFFFF) | 0x8000, (near & ~0x1FFF) | 0x1000]).view(torch.float32)
    spec = lowbit.cast(near, dtype, rounding=rounding, seed=4, backend="ref")
    assert_same_bits(lowbit.cast(near, dtype, rounding=rounding, seed=4, backend="cpu"), spec, f"cast near {dtype}")


def test_cast_from_bf16_and_fp16_inputs():
    x = varied((32, 48), seed=9)
    for src, dtype in itertools.product([torch.bfloat16, torch.float16, torch.float64], CAST_DTYPES):
        xs = x.to(src)
        for rounding in ("nearest", "stochastic"):
            spec = lowbit.cast(xs, dtype, rounding=rounding, seed=1, backend="ref")
            assert_same_bits(lowbit.cast(xs, dtype, rounding=rounding, seed=1, backend="cpu"), spec, f"{src}->{dtype}")


# ----------------------------------------------------------------------------------- hadamard
@pytest.mark.parametrize("block", [2**k for k in range(4, 16)])
def test_hadamard_every_block(block):
    rows = 2 if block >= 4096 else 3
    x = varied((rows, 2 * block if block <= 1024 else block), seed=block)
    for seed, inverse in itertools.product([None, 0, 31337], [False, True]):
        spec = lowbit.hadamard(x, block, seed=seed, inverse=inverse, backend="ref")
        assert_same_bits(lowbit.hadamard(x, block, seed=seed, inverse=inverse, backend="cpu"), spec,
                         f"hadamard b={block} seed={seed} inverse={inverse}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_hadamard_inputs_axes_and_specials(dtype):
    x = special_tensor(torch.float32 if dtype == torch.float64 else dtype).to(dtype)
    for block, axis, seed in [(16, -1, 3), (64, -1, None), (32, 0, 9)]:
        spec = lowbit.hadamard(x, block, seed=seed, axis=axis, backend="ref")
        assert_same_values(lowbit.hadamard(x, block, seed=seed, axis=axis, backend="cpu"), spec, f"{dtype} b={block}")
    x3 = varied((4, 32, 8), seed=1).to(dtype)
    spec = lowbit.hadamard(x3, 32, seed=5, axis=1, inverse=True, backend="ref")
    assert_same_bits(lowbit.hadamard(x3, 32, seed=5, axis=1, inverse=True, backend="cpu"), spec, "3-D")


# ----------------------------------------------------------------------------------- dequantize, qmatmul
@pytest.mark.parametrize("fmt,block", FORMAT_BLOCKS, ids=lambda v: str(v).replace(" ", ""))
def test_dequantize_matches_ref(fmt, block):
    for x, hadamard in ((varied((32, 64), seed=4), None), (special_tensor(torch.float32), None),
                        (varied((4, 64, 8), seed=6), 16)):
        axis = 1 if x.dim() == 3 else -1
        q = lowbit.quantize(x, fmt, block=block, axis=axis, hadamard=hadamard, backend="ref")
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            spec = lowbit.dequantize(q, dtype, backend="ref")
            assert_same_values(lowbit.dequantize(q, dtype, backend="cpu"), spec, f"dequantize {fmt} {block} {dtype}")


@pytest.mark.parametrize("fmt,block", [("fp8_e4m3", None), ("fp8_e5m2", "row"), ("fp8_e4m3", (16, 16)),
                                       ("mxfp8", None), ("mxfp4", None), ("nvfp4", (1, 16)), ("nvfp4", (16, 16))])
def test_qmatmul_matches_ref(fmt, block):
    a = lowbit.quantize(varied((32, 64), seed=1), fmt, block=block, backend="ref")
    b = lowbit.quantize(varied((48, 64), seed=2), fmt, block=block, backend="ref")
    for out_dtype in (torch.float32, torch.bfloat16):
        spec = lowbit.qmatmul(a, b, out_dtype=out_dtype, backend="ref")
        assert_same_bits(lowbit.qmatmul(a, b, out_dtype=out_dtype, backend="cpu"), spec, f"qmatmul {fmt}")


# ----------------------------------------------------------------------------------- threads, aliasing, errors
def test_results_do_not_depend_on_thread_count():
    x = varied((256, 512), seed=12, dtype=torch.bfloat16)
    x3 = varied((16, 512, 16), seed=13)

    def run_all():
        outs = []
        for (fmt, block), rounding in itertools.product(FORMAT_BLOCKS, ["nearest", "stochastic"]):
            for h in (None, 64):
                q = lowbit.quantize(x, fmt, block=block, rounding=rounding, seed=3, hadamard=h, backend="cpu")
                outs += [q.data, q.scale]
            q = lowbit.quantize(x3, fmt, block=block, axis=1, rounding=rounding, seed=3, backend="cpu")
            outs += [q.data, q.scale, lowbit.dequantize(q, backend="cpu")]
        for dtype in CAST_DTYPES:
            outs.append(lowbit.cast(x.float(), dtype, rounding="stochastic", seed=3, backend="cpu"))
        outs.append(lowbit.hadamard(x, 512, seed=3, backend="cpu"))
        return outs

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all()
        torch.set_num_threads(2)
        two = run_all()
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(one, two)):
        assert_same_bits(a, b, f"output {i}")


# ----------------------------------------------------------------------------------- the raw extension
KIND, ELEM, ROUND, MODE, OUT = codes.KIND, codes.ELEM, codes.ROUNDING, codes.SCALE_MODE, codes.OUT_DTYPE


def raw_quantize(x, kind="fp8", elem="e4m3", br=1, bk=64, rounding="nearest", seed=0, scale_mode="exact",
                 global_amax=None, hadamard_block=0, inner=1):
    """_C.quantize with names turned into codes; an int passes as it is (out-of-range codes)."""
    def c(table, v):
        return v if isinstance(v, int) else table[v]
    return _C.quantize(x, c(KIND, kind), c(ELEM, elem), br, bk, c(ROUND, rounding), seed, c(MODE, scale_mode),
                       global_amax, hadamard_block, inner)


def test_codes_match_the_extension():
    """lowbit/backends/codes.py and csrc/include/lowbit/enums.h hold the same codes."""
    assert _C.codes() == codes.TABLES


def test_outputs_are_fresh_tensors():
    x = varied((16, 64), seed=0)
    y = _C.hadamard(x, 64, None, False)
    assert y.data_ptr() != x.data_ptr()
    q = raw_quantize(x, br=16)
    ptrs = {t.data_ptr() for t in q} | {x.data_ptr()}
    assert len(ptrs) == 4


@pytest.mark.parametrize("call", [
    lambda x: raw_quantize(x, br=3),  # block does not tile
    lambda x: raw_quantize(x, br=0),
    lambda x: raw_quantize(x, kind=3),
    lambda x: raw_quantize(x, kind=-1),
    lambda x: raw_quantize(x, elem=5),
    lambda x: raw_quantize(x, rounding=2),
    lambda x: raw_quantize(x, scale_mode=3),
    lambda x: raw_quantize(x, "mx", "bf16", bk=32, scale_mode="floor"),
    lambda x: raw_quantize(x, "fp8", "e2m1"),
    lambda x: raw_quantize(x, "nvfp4", "e2m1", bk=16, scale_mode="floor"),
    lambda x: raw_quantize(x, "mx", "e2m1", bk=32, scale_mode="exact"),
    lambda x: raw_quantize(x, "mx", "e2m1", bk=32, scale_mode="floor", hadamard_block=24),
    lambda x: raw_quantize(x, "mx", "e2m1", bk=32, scale_mode="floor", inner=5),
    lambda x: raw_quantize(x, global_amax=torch.ones(())),
    lambda x: raw_quantize(x, "nvfp4", "e2m1", bk=16, global_amax=torch.ones((), dtype=torch.float64)),
    lambda x: raw_quantize(x, "nvfp4", "e2m1", bk=16, global_amax=torch.ones(2)),
    lambda x: raw_quantize(x.double()),
    lambda x: raw_quantize(x[0]),
    lambda x: _C.dequantize(torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(16, 2), torch.ones(()), KIND["mx"],
                            ELEM["e4m3"], 1, 32, 64, OUT["float32"]),
    lambda x: _C.dequantize(torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(16, 1, dtype=torch.uint8),
                            torch.ones(()), KIND["mx"], ELEM["e2m1"], 1, 32, 32, OUT["float32"]),
    lambda x: _C.dequantize(torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(16, 2, dtype=torch.uint8),
                            torch.ones(()), KIND["mx"], ELEM["e4m3"], 1, 32, 64, 3),
    lambda x: _C.cast(x.half(), ELEM["bf16"], ROUND["nearest"], 0),
    lambda x: _C.cast(x, ELEM["e2m1"], ROUND["nearest"], 0),
    lambda x: _C.cast(x, 7, ROUND["nearest"], 0),
    lambda x: _C.cast(x, ELEM["bf16"], -1, 0),
    lambda x: _C.hadamard(x, 48, None, False),
    lambda x: _C.hadamard(x, 128, None, False),
])
def test_bad_arguments_raise(call):
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        call(varied((16, 64), seed=0))


@pytest.mark.parametrize("arg,call", [
    ("kind", lambda x: raw_quantize(x, kind=3)),
    ("elem", lambda x: raw_quantize(x, elem=-2)),
    ("rounding", lambda x: raw_quantize(x, rounding=9)),
    ("scale_mode", lambda x: raw_quantize(x, "mx", "e4m3", bk=32, scale_mode="exact")),
    ("out_dtype", lambda x: _C.dequantize(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 1),
                                          torch.ones(()), KIND["fp8"], ELEM["e4m3"], 1, 64, 64, 3)),
])
def test_bad_codes_name_the_argument(arg, call):
    with pytest.raises(RuntimeError, match=rf"^{arg}: "):
        call(varied((16, 64), seed=0))


def test_bad_names_raise_in_the_wrapper():
    from lowbit.backends import cpu

    x = varied((16, 64), seed=0)
    with pytest.raises(RuntimeError, match="rounding"):  # also a ValueError (codes.CodeError)
        cpu.quantize(x, FORMATS["nvfp4"], (1, 16), "up", 0, "exact", None, 0, 1)
    with pytest.raises(ValueError, match="scale_mode"):
        cpu.quantize(x, FORMATS["mxfp8"], (1, 32), "nearest", 0, "ceil", None, 0, 1)
    with pytest.raises(TypeError, match="dtype"):
        cpu.cast(x, torch.float64, "nearest", 0)


def test_seed_above_63_bits_matches_ref():
    """The key's 64 bits reach the kernels (as a negative int64) and give the spec's bits."""
    from lowbit.backends import cpu, ref

    x = varied((16, 64), seed=4)
    for seed in (2**63 + 5, 2**64 - 1):
        for fmt, block, hb in (("nvfp4", (1, 16), 16), ("mxfp4", (1, 32), 0), ("fp8_e4m3", (16, 64), 32)):
            args = (FORMATS[fmt], block, "stochastic", seed, "exact" if fmt != "mxfp4" else "floor", None, hb, 1)
            for ours, spec in zip(cpu.quantize(x, *args), ref.quantize(x, *args)):
                assert_same_bits(ours, spec, f"{fmt} seed {seed:#x}")
        for dtype in CAST_DTYPES:
            assert_same_bits(cpu.cast(x, dtype, "stochastic", seed), ref.cast(x, dtype, "stochastic", seed), "cast")
        assert_same_values(cpu.hadamard(x, 32, seed, False), ref.hadamard(x, 32, seed, False), "hadamard")


class _Called(Exception):
    pass


class _Recorder:
    """Stands in for an extension module: stops the call and keeps the op and its arguments."""

    def __getattr__(self, op):
        def call(*args):
            raise _Called(op, args)
        return call


def _recorded(fn, *args):
    with pytest.raises(_Called) as info:
        fn(*args)
    return info.value.args


def _same_args(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.device == b.device and torch.equal(bits(a), bits(b)))
    return type(a) is type(b) and a == b


def test_cpu_and_cuda_wrappers_call_the_extensions_alike(monkeypatch):
    """Both backends pass the same argument list to _C.<op> and _C_cuda.<op> (codes.py builds it)."""
    # the modules, not the functions their packages re-export under the same names
    cpu_q, cpu_h, cuda_q, cuda_h = (importlib.import_module(f"lowbit.backends.{b}.{m}")
                                    for b in ("cpu", "cuda") for m in ("quantize", "hadamard"))
    for module in (cpu_q, cpu_h, cuda_q, cuda_h):
        monkeypatch.setattr(module, "_C", _Recorder())
    x = varied((16, 64), seed=1)
    q = lowbit.quantize(x, "nvfp4", backend="ref")
    nv, mx4, fp8 = FORMATS["nvfp4"], FORMATS["mxfp4"], FORMATS["fp8_e5m2"]
    calls = [
        ("quantize", x, nv, (1, 16), "stochastic", 2**63 + 5, "exact", 3.5, 16, 2),
        ("quantize", x.bfloat16(), mx4, (1, 32), "nearest", 7, "rceil", None, None, 1),
        ("quantize", x.half(), fp8, (16, 64), "stochastic", 0, "floor", None, 0, 4),
        ("dequantize", q.data, q.scale, q.global_scale, nv, (1, 16), 64, torch.bfloat16),
        ("dequantize", q.data, q.scale, q.global_scale, nv, (1, 16), 64, torch.float64),
        ("cast", x, torch.float8_e5m2, "stochastic", -3),
        ("cast", x, torch.float16, "nearest", 2**40),
        ("hadamard", x, 64, None, False),
        ("hadamard", x, 64, -1, True),
        ("hadamard", x, 32, 2**64 - 1, False),
    ]
    for op, *args in calls:
        cpu_fn = getattr(cpu_h if op == "hadamard" else cpu_q, op)
        cuda_fn = getattr(cuda_h if op == "hadamard" else cuda_q, op)
        ours, theirs = _recorded(cpu_fn, *args), _recorded(cuda_fn, *args)
        assert ours[0] == theirs[0] == op
        assert len(ours[1]) == len(theirs[1]) and all(map(_same_args, ours[1], theirs[1])), (op, ours, theirs)
    # One list spelled out: the conventions of codes.py (codes, the seed's bits as int64, fp32 amax).
    _, args = _recorded(cpu_q.quantize, *calls[0][1:])
    want = (x, KIND["nvfp4"], ELEM["e2m1"], 1, 16, ROUND["stochastic"], 5 - 2**63, MODE["exact"],
            torch.tensor([3.5]), 16, 2)
    assert all(map(_same_args, args, want)), args


def test_formats_cover_every_registered_format():
    # INT4 has its own rules and cases: tests/ops/test_int4_backends.py
    assert {f for f, _ in FORMAT_BLOCKS} == {n for n, f in FORMATS.items() if f.kind != "int4"}
