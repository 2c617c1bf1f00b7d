"""The cases one happy shape never reaches, on the cuda and triton backends, each compared with the
`ref` backend bit for bit (codes, scales, the NVFP4 global scale, dequantized values) for quantize +
dequantize and, where the backend has it, quantize_dual:

* grid:       an input just past the size at which every element-tiling kernel's flat launch grid
              (amax, encode, dequantize, the fused dual pass; sized from their own launch plans)
              holds more than 65535 programs, CUDA's limit on grid axes 1 and 2: only the flattened
              axis-0 indexing reaches the last tiles. Hundreds of MiB: on a GPU only.
* misaligned: the input is a view whose storage offset leaves data_ptr % 16 != 0 (vector loads must
              not assume 16-byte alignment, and nothing may read beside the view).
* stream:     the ops issued on a non-default stream that first waits ~10 ms and then writes the
              input: a kernel launched on another stream would read it before it is written.
* specials:   NaN, +Inf and -Inf in some blocks (those blocks get NaN scales; the others must not care).

Floating outputs compare as bit patterns with NaN == NaN (a NaN's payload is the device's, not the
spec's); FP8 / FP4 codes and E8M0 / E4M3 scale bytes compare exactly. The cuda parameters are marked
`cuda` and the triton ones `triton` (the gpu-check stages select them by marker); without a GPU the
Triton kernels run in Triton's interpreter on the tiny cases, and the cuda ones skip.
"""
from __future__ import annotations

import importlib.util
import math
import types

import pytest
import torch

import lowbit
from lowbit import backends

GPU = torch.cuda.is_available()


def _reason(name: str) -> str | None:
    if name == "cuda" and not GPU:
        return "no CUDA device"
    return backends.why_unavailable(name, "quantize", "cuda" if GPU else "cpu")


def _backend(name: str, mark):
    reason = _reason(name)
    return pytest.param(name, marks=[mark, pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")])


BACKENDS = [_backend("cuda", pytest.mark.cuda), _backend("triton", pytest.mark.triton)]
# backends with their own fused quantize_dual (the others have no module for it)
DUAL = {n for n in ("cuda", "triton") if importlib.util.find_spec(f"lowbit.backends.{n}.quantize_dual")}
DEV = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device (streams; sizes too large for the interpreter)")

# (format, block, rounding): every scale kind (fp32 tensor / row / 1-D / 2-D, E8M0, E4M3 + global), both
# roundings, both element widths
CASES = [
    ("fp8_e4m3", None, "nearest"),
    ("fp8_e4m3", "row", "stochastic"),
    ("fp8_e4m3", (1, 128), "nearest"),
    ("fp8_e5m2", (128, 128), "stochastic"),
    ("mxfp8", (1, 32), "nearest"),
    ("mxfp4", (1, 32), "stochastic"),
    ("nvfp4", (1, 16), "nearest"),
    ("nvfp4", (16, 16), "stochastic"),
]
SEED = 20240521
SHAPE = (128, 256)  # tiny for the interpreter; 128 rows so that the dual's column layout fits 128-blocks
# The interpreter runs every program through numpy: there one input and one output dtype (alignment and
# vector widths are a GPU matter), on a GPU both widths of each.
IN_DTYPES = (torch.bfloat16, torch.float32) if GPU else (torch.bfloat16,)
OUT_DTYPES = (torch.float32, torch.bfloat16) if GPU else (torch.float32,)


def _case_id(c) -> str:
    return f"{c[0]}-{c[1] if isinstance(c[1], (str, type(None))) else 'x'.join(map(str, c[1]))}-{c[2]}"


# ----------------------------------------------------------------------------- comparison
F8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype}{tuple(got.shape)} vs ref {want.dtype}{tuple(want.shape)}"
    g, w = got.contiguous(), want.contiguous()
    same = g.view(INT_OF_SIZE[g.element_size()]) == w.view(INT_OF_SIZE[w.element_size()])
    if g.dtype.is_floating_point and g.dtype not in F8:
        same |= torch.isnan(g) & torch.isnan(w)
    if not bool(same.all()):
        bad = (~same).nonzero()[:3].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} differ from ref, first at {bad}")


def assert_same_qtensor(got: lowbit.QTensor, want: lowbit.QTensor, backend: str, what: str) -> None:
    assert_same_bits(got.data, want.data, f"{what} codes")
    assert_same_bits(got.scale, want.scale, f"{what} scales")
    if want.global_scale is not None:
        assert_same_bits(got.global_scale, want.global_scale, f"{what} global scale")
    for dtype in OUT_DTYPES:
        assert_same_bits(got.dequantize(dtype, backend=backend), want.dequantize(dtype, backend="ref"),
                         f"{what} dequantize -> {dtype}")


def _spec(case):
    fmt, block, rounding = case
    return lowbit.QuantizeSpec(fmt, block=block, rounding=rounding, seed=SEED)


def run_both(backend: str, x: torch.Tensor, case, what: str, ref_x: torch.Tensor | None = None) -> None:
    """quantize (+ dequantize) and, where the backend has it, quantize_dual of x, each against ref
    (on ref_x, a plain copy, when x is the tensor under test)."""
    fmt, block, rounding = case
    ref_x = x if ref_x is None else ref_x
    kw = dict(block=block, rounding=rounding, seed=SEED)
    got = lowbit.quantize(x, fmt, backend=backend, **kw)
    assert_same_qtensor(got, lowbit.quantize(ref_x, fmt, backend="ref", **kw), backend, f"{backend} {what} quantize")
    if backend in DUAL:
        got = lowbit.quantize_dual(x, _spec(case), _spec(case), backend=backend)
        want = lowbit.quantize_dual(ref_x, _spec(case), _spec(case), backend="ref")
        for side, g, w in zip(("rowwise", "colwise"), got, want):
            assert_same_qtensor(g, w, backend, f"{backend} {what} quantize_dual {side}")


def _normal(shape, dtype, seed: int, device=DEV) -> torch.Tensor:
    """Normal data with magnitudes spread over 2^-8 .. 2^8 by row, made on `device` (the largest is 1 GiB)."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device)
    x *= torch.exp2(torch.randint(-8, 9, shape[:-1] + (1,), generator=g, device=device).float())
    return x.to(dtype)


# ----------------------------------------------------------------------------- (b) misaligned storage
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
def test_edge_misaligned_input_matches_ref(backend, case, dtype):
    R, K = SHAPE
    buf = _normal((R * K + 1,), dtype, seed=1)
    x = buf[1:].view(R, K)  # one element in: 2 or 4 bytes past an allocation's 256-byte alignment
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    before = buf.clone()
    run_both(backend, x, case, f"{dtype} at data_ptr % 16 = {x.data_ptr() % 16}", ref_x=x.clone())
    assert_same_bits(buf, before, "the input buffer")  # read only


# ----------------------------------------------------------------------------- (d) NaN / Inf in some blocks
def _with_specials(kind: str) -> torch.Tensor:
    R, K = SHAPE
    x = _normal(SHAPE, torch.float32, seed=2, device="cpu")
    x[5, 40] = math.inf  # row 5, 1x16 / 1x32 block 2, 16x16 tile (0, 2)
    x[70, 200] = -math.inf  # another row and column block, another 128x128 tile
    if kind == "nan+inf":
        x[33, 3] = math.nan
    return x.to(DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("kind", ["inf", "nan+inf"])
def test_edge_specials_in_some_blocks_match_ref(backend, case, kind):
    run_both(backend, _with_specials(kind), case, f"specials {kind}")


# ----------------------------------------------------------------------------- (c) a non-default stream
@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_edge_non_default_stream_matches_ref(backend, case):
    src = _normal((1024, 2048), torch.bfloat16, seed=3)
    x = torch.empty_like(src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # src is ready before the side stream starts
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # ~10 ms of spinning: work on any other stream runs ahead of the copy
        x.copy_(src)
        got = lowbit.quantize(x, case[0], block=case[1], rounding=case[2], seed=SEED, backend=backend)
        out = got.dequantize(torch.float32, backend=backend)
        dual = lowbit.quantize_dual(x, _spec(case), _spec(case), backend=backend) if backend in DUAL else ()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    want = lowbit.quantize(src, case[0], block=case[1], rounding=case[2], seed=SEED, backend="ref")
    assert_same_qtensor(got, want, backend, f"{backend} on a side stream")
    assert_same_bits(out, want.dequantize(torch.float32, backend="ref"), f"{backend} dequantize on a side stream")
    for side_name, g, w in zip(("rowwise", "colwise"), dual,
                               lowbit.quantize_dual(src, _spec(case), _spec(case), backend="ref")):
        assert_same_qtensor(g, w, backend, f"{backend} quantize_dual {side_name} on a side stream")


# ----------------------------------------------------------------------------- (a) past one grid axis
def _grids(R: int, K: int, block) -> dict[str, int]:
    """Programs on grid axis 0 of each element-tiling kernel for an [R, K] input, from its launch plan."""
    from lowbit.backends.triton import _amax, _dequantize, _quantize, _quantize_dual

    br, bk = (R, K) if block is None else (1, K) if block == "row" else block
    cbr, cbk = (K, R) if block is None else (1, R) if block == "row" else block  # the dual's [K, T] layout
    row = types.SimpleNamespace(hadamard=0, rows=R, block=(br, bk))
    col = types.SimpleNamespace(hadamard=0, rows=R, block=(cbr, cbk))
    grids = {"amax": _amax.launch_plan(R, K, br, bk)[1][0], "encode": _quantize.encode_plan(R, K)[0][0],
             "dequantize": _dequantize.launch_plan(R, K)[0][0]}
    tiles = _quantize_dual.plan(R, K, row, col)
    if tiles is not None:
        grids["quantize_dual"] = _quantize_dual.launch_plan(R, K, *tiles)[0]
    return grids


def rows_past_one_grid_axis(K: int, block) -> int:
    """The fewest rows (a multiple of 128, so every block divides) for which every kernel in `_grids`
    launches more programs than fit one CUDA grid axis other than the first."""
    from lowbit.backends.triton import _limits

    limit = _limits.MAX_GRID[1]
    lo, hi = 1, 1
    while min(_grids(128 * hi, K, block).values()) <= limit:
        lo, hi = hi, hi * 2
    while lo < hi:  # the grids grow with R: bisect for the first multiple of 128 past the limit
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if min(_grids(128 * mid, K, block).values()) <= limit else (lo, mid)
    return 128 * hi


def test_edge_grid_size_is_just_past_the_axis_limit():
    """The size the GPU test below uses: every kernel is past the limit, and 128 rows fewer one is not."""
    pytest.importorskip("triton")
    from lowbit.backends.triton import _limits

    for case in CASES:
        R = rows_past_one_grid_axis(256, case[1])
        assert min(_grids(R, 256, case[1]).values()) > _limits.MAX_GRID[1]
        assert min(_grids(R - 128, 256, case[1]).values()) <= _limits.MAX_GRID[1], case


CHUNK = 65536  # rows of ref at a time: ref keeps ~120 bytes an element in flight, too much for the whole input


def _slice(q: lowbit.QTensor, lo: int, hi: int, dim: int, dq: torch.Tensor):
    """Codes, scales and dequantized values of elements lo:hi of q's [R, K] view along dim (0: rows, 1: the
    quantized dim); a tensor-wide scale whole. dq: q dequantized."""
    p = q.parts()
    br, bk = p.block
    whole = p.scale.numel() == 1
    if dim == 0:
        return p.data[lo:hi], p.scale if whole else p.scale[lo // br:hi // br], dq[lo:hi]
    pk = 2 if p.fmt.packed else 1
    return p.data[:, lo // pk:hi // pk], p.scale if whole else p.scale[:, lo // bk:hi // bk], dq[:, lo:hi]


def _compare_chunk(got, want, lo, n, dim, g_dq, w_dq, what):
    for name, g, w in zip(("codes", "scales", "dequantized"), _slice(got, lo, lo + n, dim, g_dq),
                          _slice(want, 0, n, dim, w_dq)):
        assert_same_bits(g, w, f"{what} rows {lo}:{lo + n} {name}")
    if want.global_scale is not None:
        assert_same_bits(got.global_scale, want.global_scale, f"{what} global scale")


@pytest.mark.slow
@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_edge_input_past_one_grid_axis_matches_ref(backend, case):
    """ref runs CHUNK rows at a time, each chunk followed by the input's last 128 rows: blocks never straddle
    a chunk (128 is a multiple of every block's rows), and the one tensor-wide maximum, planted in the last
    tile, sets the same tensor-wise / NVFP4 global scale in every chunk as in the whole - so a kernel that
    drops the last programs shows. Nearest rounding: stochastic bits are indexed over the whole tensor."""
    fmt, block, _ = case
    K = 256
    R = rows_past_one_grid_axis(K, block)
    x = _normal((R, K), torch.bfloat16, seed=4)
    x[-1, -1] = 3.0e4  # above everything else (|x| < 2^8 * 6)
    tail = x[-128:]
    got = lowbit.quantize(x, fmt, block=block, backend=backend)
    g_dq = got.dequantize(torch.float32, backend=backend)
    dual = backend in DUAL
    if dual:
        spec = lowbit.QuantizeSpec(fmt, block=block)
        g_row, g_col = lowbit.quantize_dual(x, spec, spec, backend=backend)
        g_row_dq, g_col_dq = g_row.dequantize(torch.float32, backend=backend), g_col.dequantize(torch.float32,
                                                                                                backend=backend)
    for lo in range(0, R, CHUNK):
        n = min(CHUNK, R - lo)
        xc = torch.cat([x[lo:lo + n], tail])
        want = lowbit.quantize(xc, fmt, block=block, backend="ref")
        _compare_chunk(got, want, lo, n, 0, g_dq, want.dequantize(torch.float32, backend="ref"), f"{backend} {fmt}")
        if dual:
            w_row, w_col = lowbit.quantize_dual(xc, spec, spec, backend="ref")
            _compare_chunk(g_row, w_row, lo, n, 0, g_row_dq, w_row.dequantize(torch.float32, backend="ref"),
                           f"{backend} {fmt} quantize_dual rowwise")
            if block != "row":  # a column-layout row spans all tokens: not chunkable
                _compare_chunk(g_col, w_col, lo, n, 1, g_col_dq, w_col.dequantize(torch.float32, backend="ref"),
                               f"{backend} {fmt} quantize_dual colwise")


# ----------------------------------------------------------------------------- a device global_amax
@needs_gpu
@pytest.mark.cuda
def test_edge_device_global_amax_is_not_read_back():
    """NVFP4 with a CUDA `global_amax`: no host sync (reading it would wait for the GPU); a negative
    one gives NaN scales instead of wrong values, and check=True refuses it."""
    x = _normal((64, 128), torch.bfloat16, seed=5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        good = lowbit.quantize(x, "nvfp4", global_amax=x.abs().amax().float())
        bad = lowbit.quantize(x, "nvfp4", global_amax=torch.tensor(-2.0, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = lowbit.quantize(x, "nvfp4", global_amax=x.abs().amax().float().cpu().item(), backend="ref")
    assert_same_bits(good.dequantize(torch.float32), want.dequantize(torch.float32, backend="ref"), "device amax")
    assert torch.isnan(bad.dequantize(torch.float32)).all()
    with pytest.raises(ValueError, match="global_amax"):
        lowbit.quantize(x, "nvfp4", global_amax=torch.tensor(-2.0, device="cuda"), check=True)
