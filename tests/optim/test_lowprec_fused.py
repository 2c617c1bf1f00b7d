"""The fused native step on bf16 / fp8 / int8 moments (csrc/cpu/optim_lowprec.cpp) against the spec path
(decode with torch, `kernels.adam_step`, encode with lowbit.stochastic_round / lowbit.quantize / bucketize),
bit for bit: parameters, stored codes and block scales (NaN payloads aside, see `_same`)."""
import math

import pytest
import torch

from lowbit import backends
from lowbit.optim import StableSPAM, kernels
from lowbit.optim import state as S
from lowbit.optim.zero import FlatLayout, PartitionLayout, TensorSlice

from _step_scalars import random_scalars

LOWPREC = ("bf16", "fp8", "int8")
NATIVE = backends.why_unavailable("cpu", "optim_lowprec_step", "cpu") is None
needs_native = pytest.mark.skipif(not NATIVE, reason="lowbit._C has no optim_lowprec_step (rebuild with pip install -e .)")

# scalar, partial blocks (fp8 128, int8 256), and one tensor over several 2^15-element work items
SHAPES = [(), (5,), (33, 70), (0,), (33_001,)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN compares equal to the same NaN."""
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16,):
        return t.view(torch.int16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8)
    return t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bits, except that any NaN equals any NaN in fp32 tensors (parameters, block scales): the
    payload of NaN x NaN is whichever operand the compiled code names first, which no spec fixes.
    Stored codes (bf16, fp8, int8) compare bit for bit, NaN codes included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float32:
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a.masked_fill(nan, 0.0), b.masked_fill(nan, 0.0)
    return torch.equal(_bits(a), _bits(b))


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls of the native fused step."""
    import lowbit.backends.cpu.optim as cpu

    calls = []
    orig = cpu.optim_lowprec_step

    def counted(*args):
        calls.append(args[0])
        return orig(*args)

    monkeypatch.setattr(cpu, "optim_lowprec_step", counted)
    return calls


def _grads(shapes, steps, seed):
    """Magnitudes over ~1e-5..1e5 inside each tensor (so small second moments underflow in fp8 / int8
    and their first moments are masked), spikes at step 4 (AdaClip clips), a NaN gradient at step 6."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(steps):
        row = []
        for s in shapes:
            n = math.prod(s)
            x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
            if t == 4 and n > 4:
                x[:3] *= 1e4
            row.append(x.reshape(s))
        if t == 6:
            row[2] = row[2].clone()
            row[2].view(-1)[1] = float("nan")
        rows.append(row)
    return rows


def _run(backend, state_dtype, threads, shapes=SHAPES, steps=9, **kw):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = StableSPAM(ps, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, seed=5, **kw)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.use_backend(backend):
            for row in _grads(shapes, steps, 1):
                for p, x in zip(ps, row):
                    p.grad = x.clone()
                opt.step()
    finally:
        torch.set_num_threads(n)
    return ps, opt


def _same_value(a, b) -> bool:
    """`_same` for tensors, also inside the lists and dicts of a state (a ZeRO carrier's per-tensor
    statistics); == for the rest."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_run(a, b):
    (pa, oa), (pb, ob) = a, b
    assert _same_value(oa.stats, ob.stats)
    for x, y in zip(pa, pb):
        assert _same(x.detach(), y.detach())
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert _same_value(sa[k], sb[k]), k


# The optimizer-level runs use one thread (many small torch ops; the thread count changes no bit of
# the fused kernel, whose work items are independent: the kernel tests below run it with 2 threads).
@needs_native
@pytest.mark.parametrize("state_dtype", LOWPREC)
@pytest.mark.parametrize("compat", [None, "official"])
def test_fused_step_bit_exact_with_spec(state_dtype, compat, native_calls):
    """Clean mode zeroes the moments before the update at a reset (the `zero` scalar), official mode
    after it (`zero_after`); both reset at step 5 here, and AdaClip clips at the spike."""
    kw = dict(reset_interval=5, compat=compat)
    ref = _run("ref", state_dtype, 1, **kw)
    assert native_calls == []  # use_backend("ref") runs the spec
    got = _run("cpu", state_dtype, 1, **kw)
    assert native_calls and set(native_calls) == {state_dtype}
    _assert_same_run(ref, got)
    stats = ref[1].stats
    assert stats["clipped"] > 0 and stats["resets"] == 1 and stats["nonfinite_skipped"] == 1
    if compat is None:
        _assert_same_run(ref, _run(None, state_dtype, 1, **kw))  # auto picks the native kernel


@needs_native
@pytest.mark.parametrize("state_dtype", ["fp8", "int8"])
def test_fp8_int8_masks_first_moment_where_second_underflows(state_dtype):
    """A block whose second moment spans far more than the format's range: many v decode to 0 and
    their m is zeroed before the step; the fused path must do the same (checked on the codes)."""
    ps, opt = _run("cpu", state_dtype, 1, shapes=[(512,)], steps=3)
    v = S.load_moment(opt.state[ps[0]], "exp_avg_sq", (512,), state_dtype)
    assert (v == 0).sum() > 0
    ref = _run("ref", state_dtype, 1, shapes=[(512,)], steps=3)
    _assert_same_run(ref, (ps, opt))


# ---- ZeRO flat partitions: several pieces per carrier, blocks spanning two pieces, dead elements ----
FLAT = [(16, 8), (8,), (300,), (33_000,), (7,)]
PAD = 5


def _flat_run(backend, state_dtype, threads, steps=8, compat=None):
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in FLAT]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = StableSPAM(params, lr=1e-2, weight_decay=0.1, reset_interval=4, state_dtype=state_dtype, seed=9,
                     compat=compat)
    flat = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in init] + [torch.zeros(PAD)]))
    opt.param_groups[0]["params"] = [flat]
    tensors, start = [], 0
    for i, p in enumerate(params):
        n = p.numel()
        if i == 4:  # this rank holds 3 of the 7 elements of the last tensor
            tensors.append(TensorSlice(n, start + 2, 3))
        else:
            tensors.append(TensorSlice(n, start, n))
        start += n
    tensors.append(TensorSlice(11, None, 0))  # a tensor this rank holds none of
    opt.set_partition_layout(PartitionLayout([(flat, FlatLayout(tuple(tensors), None))]))
    rows = _grads(FLAT, steps, 4)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.use_backend(backend):
            for t, row in enumerate(rows):
                parts = [x.reshape(-1) for x in row]
                if t == 2:
                    parts[1] = parts[1].clone()
                    parts[1][0] = float("inf")  # tensor 1 is skipped: its elements are only re-encoded
                flat.grad = torch.cat(parts + [torch.zeros(PAD)])
                opt.step()
    finally:
        torch.set_num_threads(n)
    return [flat], opt


@needs_native
@pytest.mark.parametrize("state_dtype", LOWPREC)
def test_fused_step_on_flat_partition_bit_exact(state_dtype, native_calls):
    ref = _flat_run("ref", state_dtype, 1)
    got = _flat_run("cpu", state_dtype, 1)
    assert native_calls
    assert ref[1].stats["nonfinite_skipped"] >= 1 and ref[1].stats["clipped"] > 0
    _assert_same_run(ref, got)


@needs_native
def test_flat_partition_official_reset_after_update(native_calls):
    _assert_same_run(_flat_run("ref", "int8", 1, compat="official"), _flat_run("cpu", "int8", 1, compat="official"))
    assert native_calls


# ---- the kernel itself: special values in the stored moments, scalars per piece ----
SKIP, ZERO_AFTER = len(kernels.SCALARS) - 1, len(kernels.SCALARS)  # columns of a piece's row


def _spec_step(state_dtype, carriers, pieces, grads, rows, seeds):
    """What StableSPAM._step_pieces does without the fused kernel: the spec's composition. A carrier
    none of whose pieces steps is left out; a skipped piece is left by the step and not zeroed after."""
    live = sorted({c for (c, _, _), r in zip(pieces, rows) if not r[SKIP]})
    keep = [i for i, (c, _, _) in enumerate(pieces) if c in live]
    moments = {c: S.load_moments(carriers[c][1], carriers[c][0].shape, state_dtype) for c in live}
    sel = [pieces[i] for i in keep]
    with backends.use_backend("ref"):
        kernels.adam_step([carriers[c][0].view(-1).narrow(0, s, n) for c, s, n in sel], [grads[i] for i in keep],
                          [moments[c][0].view(-1).narrow(0, s, n) for c, s, n in sel],
                          [moments[c][1].view(-1).narrow(0, s, n) for c, s, n in sel],
                          torch.tensor([rows[i][:SKIP + 1] for i in keep], dtype=torch.float64).reshape(-1, SKIP + 1))
    for (c, s, n), r in zip(pieces, rows):
        if r[ZERO_AFTER] and not r[SKIP]:
            moments[c][0].view(-1).narrow(0, s, n).zero_()
            moments[c][1].view(-1).narrow(0, s, n).zero_()
    for c in live:
        (m, v), (sm, sv) = moments[c], seeds[c]
        with backends.use_backend("ref"):
            S.store_moment(carriers[c][1], "exp_avg", m, state_dtype, sm)
            S.store_moment(carriers[c][1], "exp_avg_sq", v, state_dtype, sv)


def _row(i, clip, zero, zero_after, skip=False):
    return random_scalars(50 + i, clip, zero, skip) + (1.0 if zero_after else 0.0,)


def _carriers(state_dtype, sizes, g):
    """(fp32 params, stored moments) per size, with an infinite v, a NaN m and a run of v = 0 where
    the carrier is large enough."""
    carriers = []
    for n in sizes:
        st = {}
        m = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
        v = m * m * torch.rand(n, generator=g)
        if n > 10:
            v[3] = float("inf")  # a block with an infinite second moment
            m[700 % n] = float("nan")  # and one with a NaN first moment
            v[500 % n:500 % n + 20] = 0.0
        S.store_moment(st, "exp_avg", m, state_dtype, seed=1)
        S.store_moment(st, "exp_avg_sq", v, state_dtype, seed=2)
        carriers.append((torch.randn(n, generator=g), st))
    return carriers


def _native_step(state_dtype, carriers, pieces, grads, rows, seeds, threads=1):
    stored = [S.stored_moments(st, p, state_dtype) for p, st in carriers]
    scaled = state_dtype != "bf16"
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.use_backend("cpu"):
            assert kernels.lowprec_step(state_dtype, [p for p, _ in carriers], [x[0] for x in stored],
                                        [x[1] for x in stored] if scaled else [], [x[2] for x in stored],
                                        [x[3] for x in stored] if scaled else [], grads, pieces, rows, seeds,
                                        S.int8_books("cpu") if state_dtype == "int8" else [])
    finally:
        torch.set_num_threads(n)


def _copy(carriers):
    return [(p.clone(), {k: t.clone() for k, t in st.items()}) for p, st in carriers]


def _assert_same_carriers(got, want):
    for (p, st), (rp, rst) in zip(got, want):
        assert _same(p, rp)
        assert st.keys() == rst.keys()
        for k in st:
            assert _same(st[k].reshape(rst[k].shape), rst[k]), k


@needs_native
@pytest.mark.parametrize("state_dtype", LOWPREC)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_special_values_and_piece_scalars(state_dtype, threads, native_calls):
    g = torch.Generator().manual_seed(11)
    carriers = _carriers(state_dtype, [1000, 33_000, 1], g)
    # carrier 0: three pieces with different scalars and a gap; carrier 1: two pieces crossing a
    # block and a work item; carrier 2: one element
    pieces = [(0, 0, 100), (0, 100, 300), (0, 650, 350), (1, 0, 32_800), (1, 32_800, 200), (2, 0, 1)]
    rows = [_row(i, clip=i % 2 == 0, zero=i == 1, zero_after=i == 2) for i in range(len(pieces))]
    grads = [torch.randn(n, generator=g) * 10 for _, _, n in pieces]
    seeds = [(S.sr_seed(1, 7, i, 0), S.sr_seed(1, 7, i, 1)) for i in range(len(carriers))]
    ref = _copy(carriers)
    _spec_step(state_dtype, ref, pieces, grads, rows, seeds)
    _native_step(state_dtype, carriers, pieces, grads, rows, seeds, threads)
    assert native_calls == [state_dtype]
    _assert_same_carriers(carriers, ref)


@needs_native
@pytest.mark.parametrize("state_dtype", LOWPREC)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_skipped_pieces_and_carriers(state_dtype, threads, native_calls):
    """A skipped piece (its NaN gradient never read, its zero / zero_after flags ignored) beside stepped
    ones is a gap: its elements are decoded and re-encoded with their blocks. A carrier whose pieces
    all skip, or that has none, keeps its parameter, codes and scales bit for bit."""
    g = torch.Generator().manual_seed(12)
    carriers = _carriers(state_dtype, [1000, 33_000, 600, 300], g)
    # carrier 0: stepped, skipped (inside a block), stepped; carrier 1: a skipped piece over two work
    # items and a stepped one; carrier 2: two skipped pieces; carrier 3: no piece
    pieces = [(0, 0, 100), (0, 100, 300), (0, 650, 350), (1, 0, 32_900), (1, 32_900, 100), (2, 0, 200),
              (2, 300, 300)]
    skip = [False, True, False, True, False, True, True]
    rows = [_row(i, clip=i % 2 == 0, zero=i in (1, 5), zero_after=i in (1, 2, 6), skip=s)
            for i, s in enumerate(skip)]
    grads = [torch.full((n,), float("nan")) if s else torch.randn(n, generator=g) * 10
             for (_, _, n), s in zip(pieces, skip)]
    seeds = [(S.sr_seed(1, 7, i, 0), S.sr_seed(1, 7, i, 1)) for i in range(len(carriers))]
    before = _copy(carriers)
    ref = _copy(carriers)
    _spec_step(state_dtype, ref, pieces, grads, rows, seeds)
    _native_step(state_dtype, carriers, pieces, grads, rows, seeds, threads)
    assert native_calls == [state_dtype]
    _assert_same_carriers(carriers, ref)
    _assert_same_carriers(carriers[2:], before[2:])  # no piece to step: not even re-encoded
    assert _same(carriers[0][0][100:400], before[0][0][100:400])  # the skipped piece's weights
    assert not _same(carriers[0][0][:100], before[0][0][:100])


@needs_native
def test_kernel_rejects_bad_input_with_the_argument_named():
    import lowbit.backends.cpu.optim as cpu

    p, m, v = torch.zeros(300), torch.zeros(300, dtype=torch.bfloat16), torch.zeros(300, dtype=torch.bfloat16)
    row = _row(0, False, False, False)

    def call(**over):
        args = dict(state_dtype="bf16", params=[p], ms=[m], m_scales=[], vs=[v], v_scales=[],
                    grads=[torch.zeros(300)], pieces=[(0, 0, 300)], scalars=[row], seeds=[(1, 2)], books=[])
        args.update(over)
        with backends.use_backend("cpu"):
            kernels.lowprec_step(**args)

    call()
    with pytest.raises(RuntimeError, match="state_dtype"):
        call(state_dtype="fp16")
    with pytest.raises(RuntimeError, match=r"ms\[0\]"):
        call(ms=[torch.zeros(300)])
    with pytest.raises(RuntimeError, match="ms, vs"):
        call(ms=[torch.zeros(299, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match="pieces"):
        call(pieces=[(0, 100, 300)])
    with pytest.raises(RuntimeError, match="overlap"):
        call(pieces=[(0, 0, 200), (0, 100, 100)], grads=[torch.zeros(200), torch.zeros(100)], scalars=[row, row])
    with pytest.raises(RuntimeError, match=r"grads\[0\]"):
        call(grads=[torch.zeros(299)])
    with pytest.raises(RuntimeError, match="seeds"):
        call(seeds=[(-1, 2)])
    with pytest.raises(RuntimeError, match=r"scalars: expected a contiguous \[P, 15\] fp64 CPU tensor"):
        cpu.optim_lowprec_step("bf16", [p], [m], [], [v], [], [torch.zeros(300)], torch.tensor([[0, 0, 300]]),
                               torch.tensor([row[:14]], dtype=torch.float64), torch.tensor([[1, 2]]), [])
    with pytest.raises(RuntimeError, match="m_scales"):
        call(state_dtype="fp8")
    with pytest.raises(RuntimeError, match="books"):
        call(state_dtype="int8", ms=[torch.zeros(512, dtype=torch.uint8)], vs=[torch.zeros(512, dtype=torch.uint8)],
             m_scales=[torch.zeros(2)], v_scales=[torch.zeros(2)])


def test_ref_backend_never_calls_native(monkeypatch):
    import lowbit.backends.cpu.optim as cpu

    if NATIVE:
        monkeypatch.setattr(cpu, "optim_lowprec_step", lambda *a: pytest.fail("native step under use_backend('ref')"))
    with backends.use_backend("ref"):
        assert kernels.lowprec_step("int8", [torch.zeros(3)], [], [], [], [], [], [], [], [], []) is False


@needs_native
def test_bf16_master_weights_and_fp64_params_take_the_unfused_path(native_calls):
    p16 = torch.nn.Parameter(torch.ones(300, dtype=torch.bfloat16))
    p64 = torch.nn.Parameter(torch.ones(300, dtype=torch.float64))
    opt = StableSPAM([p16, p64], state_dtype="int8", param_rounding="stochastic")
    p16.grad, p64.grad = torch.ones_like(p16), torch.ones_like(p64)
    opt.step()
    assert native_calls == []
    assert p16.dtype == torch.bfloat16 and opt.state[p64]["exp_avg"].dtype == torch.uint8


@needs_native
def test_int8_code_choice_at_and_next_to_midpoints(native_calls):
    """Values exactly at the code books' midpoints (torch.bucketize sends a tie to the lower code) and
    one ulp to either side. The scalars make the step write m = g and v = g * g (moments zeroed,
    beta1 = beta2 = 0), so the encoder sees these values unchanged."""
    _, mids_m = S._codebook(True, "cpu")
    _, mids_v = S._codebook(False, "cpu")
    one = torch.ones(1)
    up = torch.nextafter(mids_m, torch.tensor(2.0))
    down = torch.nextafter(mids_m, torch.tensor(-2.0))
    g = torch.cat([one, mids_m, one, up, one, down, one * 0.125, mids_m * 0.125,
                   one, mids_v.sqrt(), one, torch.nextafter(mids_v.sqrt(), torch.tensor(2.0))])
    n = g.numel()
    f32 = kernels.f32
    row = (0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, f32(1e-8), 1.0, f32(1e-3), 1.0, 0.0, 0.0)
    st = {}
    S.init_moment(st, "exp_avg", torch.zeros(n), "int8")
    S.init_moment(st, "exp_avg_sq", torch.zeros(n), "int8")
    p = torch.randn(n, generator=torch.Generator().manual_seed(2))
    ref = [(p.clone(), {k: t.clone() for k, t in st.items()})]
    _spec_step("int8", ref, [(0, 0, n)], [g], [row], [(0, 0)])
    assert torch.equal(S.load_moment(ref[0][1], "exp_avg", (n,), "int8")[: 256], S.int8_decode(
        torch.bucketize(g[:256], mids_m).to(torch.uint8)[None], torch.ones(1), True, (256,)))  # ties go down
    m, msc, v, vsc = S.stored_moments(st, p, "int8")
    with backends.use_backend("cpu"):
        assert kernels.lowprec_step("int8", [p], [m], [msc], [v], [vsc], [g], [(0, 0, n)], [row], [(0, 0)],
                                    S.int8_books("cpu"))
    assert native_calls == ["int8"]
    assert _same(p, ref[0][0])
    for k in st:
        assert _same(st[k], ref[0][1][k]), k


@needs_native
def test_non_contiguous_parameter_takes_the_unfused_path(native_calls):
    out = {}
    for backend in ("ref", None):  # auto: an explicit "cpu" refuses the non-contiguous unfused step
        p = torch.nn.Parameter(torch.randn(40, 30, generator=torch.Generator().manual_seed(0)).t())
        q = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(1)))
        opt = StableSPAM([p, q], lr=1e-2, state_dtype="fp8")
        with backends.use_backend(backend):
            for t in range(3):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + t))
                q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(20 + t))
                opt.step()
        out[backend] = (p.detach().clone(), q.detach().clone(), opt.state[p]["exp_avg"].clone())
    assert native_calls == ["fp8"] * 3  # q only
    for a, b in zip(out["ref"], out[None]):
        assert _same(a, b)
