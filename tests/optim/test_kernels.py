"""The Stable-SPAM step kernels: the spec in lowbit/backends/ref/optim.py against an independent reading
of its definition, and every native backend against the spec, bit for bit (atol = 0) in fp32."""
import math

import pytest
import torch

from lowbit import backends
from lowbit.optim import StableSPAM, kernels

from _step_scalars import random_scalars
from test_stable_spam import HP, grad_stream, run_lowbit

NATIVE = [name for name in ("cpu",) if backends.why_unavailable(name, "optim_adam_step", "cpu") is None]
needs_native = pytest.mark.skipif(not NATIVE, reason="lowbit._C has no optimizer kernels (rebuild with pip install -e .)")


def sumsq_by_definition(x: torch.Tensor) -> float:
    """Lane i mod 16 of row i div 16; adjacent pairwise tree over rows (zero padded to a power of
    two), then over the 16 lanes; written with Python floats and recursion."""
    vals = [float(v) ** 2 for v in x.reshape(-1).tolist()]  # fp32 -> float64 square, exact

    def tree(seq):
        if len(seq) == 1:
            return seq[0]
        size = 1 << (len(seq) - 1).bit_length()
        seq = seq + [0.0] * (size - len(seq))
        half = [seq[2 * i] + seq[2 * i + 1] for i in range(size // 2)]
        return tree(half)

    rows = max(1, math.ceil(len(vals) / 16))
    vals += [0.0] * (rows * 16 - len(vals))
    lanes = [tree([vals[r * 16 + k] for r in range(rows)]) for k in range(16)]
    return tree(lanes)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 31, 48, 1000, 4133])
def test_sumsq_spec_follows_its_definition(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-3, 3, n)
    assert kernels.sumsq_spec(x).item() == sumsq_by_definition(x)


def _tensors(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))  # magnitudes over ~1e-5..1e5
        out.append(x)
    return out


# sizes crossing the native kernels' work-item boundaries (4096 rows of 16 for statistics, 2^15 for the step)
SIZES = [0, 1, 15, 16, 17, 4096 * 16 - 1, 4096 * 16 + 1, 3 * 4096 * 16 + 7, 2 ** 15 + 3, 200_000]


def _table(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _same_stats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two [n, 2] fp64 statistics tables on one device: equal, NaN where the other has NaN."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.dtype != torch.float64:
        return False
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _clip_table(amax: torch.Tensor) -> torch.Tensor:
    """AdaClip rows (clip, mh = 0.3 max |g|, r = 0.25); clip off for every third tensor and for the
    non-finite ones (as the optimizer has it: those are skipped)."""
    f32 = kernels.f32
    return _table([(1.0 if math.isfinite(a) and i % 3 else 0.0, f32(0.3 * a), f32(0.25))
                   for i, a in enumerate(amax.tolist())])


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
def test_statistics_bit_exact(backend):
    gs = _tensors(SIZES)
    gs[3] = gs[3].clone()
    gs[3][4] = float("nan")
    gs[5] = gs[5].clone()
    gs[5][-1] = -float("inf")
    with backends.use_backend("ref"):
        ref = kernels.grad_stats(gs)
    with backends.use_backend(backend):
        got = kernels.grad_stats(gs)
    assert _same_stats(ref, got) and got.shape == (len(gs), 2)
    assert torch.isinf(got[:, 0]).sum() == 2  # max |g| is +inf for the two non-finite tensors
    table = _clip_table(ref[:, 0])
    with backends.use_backend("ref"):
        ref_c = kernels.clip_stats(gs, table)
    with backends.use_backend(backend):
        got_c = kernels.clip_stats(gs, table)
    assert torch.equal(ref_c, got_c) and got_c[:, 1].sum() > 0
    off = table[:, 0] == 0  # (0, 0), the NaN / Inf gradients among them: not read
    assert off.sum() >= 4 and torch.equal(got_c[off], torch.zeros(int(off.sum()), 2, dtype=torch.float64))


def _scalars(i, clip, zero, skip=False):
    return random_scalars(100 + i, clip, zero, skip)


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("threads", [1, 2])
def test_adam_step_bit_exact(backend, threads):
    sizes = [n for n in SIZES if n]
    params, grads, ms, vs = _tensors(sizes, 1), _tensors(sizes, 2), _tensors(sizes, 3), _tensors(sizes, 4)
    vs = [v.abs() for v in vs]
    scalars = _table([_scalars(i, clip=i % 2 == 0, zero=i % 3 == 0) for i in range(len(sizes))])
    ref = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    got = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    with backends.use_backend("ref"):
        kernels.adam_step(ref[0], grads, ref[1], ref[2], scalars, foreach=True)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.use_backend(backend):
            kernels.adam_step(got[0], grads, got[1], got[2], scalars)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(sum(ref, []), sum(got, [])):
        assert torch.equal(a, b)
    assert not torch.equal(ref[0][0], params[0])  # the step did move the weights


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
def test_adam_step_skipped_rows_leave_their_tensors_untouched(backend):
    """Rows with skip set (some with clip / zero set too) among stepped ones: their params, m, v keep
    every bit and their NaN gradients are not read; the others get the spec's step, in both of the
    spec's paths and natively."""
    sizes = [n for n in SIZES if n]
    params, grads, ms, vs = _tensors(sizes, 1), _tensors(sizes, 2), _tensors(sizes, 3), _tensors(sizes, 4)
    vs = [v.abs() for v in vs]
    skip = [i % 3 == 1 for i in range(len(sizes))]
    grads = [torch.full_like(g, float("nan")) if s else g for g, s in zip(grads, skip)]
    scalars = _table([_scalars(i, clip=i % 2 == 0, zero=i % 4 == 0, skip=s) for i, s in enumerate(skip)])
    runs = []
    for name, foreach in (("ref", True), ("ref", False), (backend, True)):
        state = [[t.clone() for t in ts] for ts in (params, ms, vs)]
        with backends.use_backend(name):
            kernels.adam_step(state[0], grads, state[1], state[2], scalars, foreach=foreach)
        runs.append(state)
    for state in runs:
        for ts, orig in zip(state, (params, ms, vs)):
            for i, (t, o) in enumerate(zip(ts, orig)):
                assert _same_bits(t, o) if skip[i] else not torch.equal(t, o), i
        for a, b in zip(sum(state, []), sum(runs[0], [])):
            assert _same_bits(a, b)


@needs_native
def test_native_kernels_reject_bad_tables_with_the_argument_named():
    from lowbit.backends.cpu import optim as cpu

    ts = [[torch.zeros(5), torch.zeros(3)] for _ in range(4)]
    ok = _table([_scalars(i, False, False) for i in range(2)])
    cpu.optim_adam_step(*ts, ok)
    cpu.optim_adam_step(*ts, ok.t().contiguous().t())  # any strides
    for bad, what in ((ok[:, :13], r"\[2, 14\] fp64 tensor, got"), (ok[:1], r"\[2, 14\]"),
                      (ok.float(), "Float"), (ok.to("meta"), "on the CPU, got one on meta")):
        with pytest.raises(RuntimeError, match="scalars: expected .*" + what):
            cpu.optim_adam_step(*ts, bad)
    table = _table([(1.0, 0.5, 0.25), (0.0, 0.5, 0.25)])
    assert cpu.optim_clip_stats(ts[1], table).shape == (2, 2)
    for bad in (table[:, :2], table[:1], table.to("meta")):
        with pytest.raises(RuntimeError, match=r"table: expected a \[2, 3\] fp64 tensor"):
            cpu.optim_clip_stats(ts[1], bad)


def _run(backend, foreach, **kw):
    stream = grad_stream(300)
    stream[40][2] = stream[40][2].clone()
    stream[40][2].view(-1)[7] = float("nan")
    stream[90][0] = stream[90][0].clone()
    stream[90][0][1, 1] = float("inf")
    with backends.use_backend(backend):
        got, opt = run_lowbit(stream, dtype=torch.float32, reset_interval=100, foreach=foreach, **kw)
    return got, [opt.state[p] for p in opt.param_groups[0]["params"]], dict(opt.stats)


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("compat, total_steps", [(None, None), (None, 150), ("official", 150)])
def test_optimizer_native_bit_exact_with_spec(backend, compat, total_steps):
    """300 fp32 steps with spikes, resets, a skipped NaN / Inf gradient and a tensor without a
    gradient every 5th step: the native step, the spec's foreach and per-tensor paths agree."""
    runs = [_run("ref", True, compat=compat, total_steps=total_steps),
            _run("ref", False, compat=compat, total_steps=total_steps),
            _run(backend, True, compat=compat, total_steps=total_steps)]
    p0, s0, c0 = runs[0]
    assert c0["clipped"] > 0 and c0["nonfinite_skipped"] == 2 and c0["resets"] == 3
    for p, s, c in runs[1:]:
        assert c == c0
        for x, y in zip(p, p0):
            assert torch.equal(x, y)
        for x, y in zip(s, s0):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k


@needs_native
def test_auto_uses_native_for_fp32_and_spec_otherwise():
    assert kernels._native("optim_adam_step", [torch.zeros(3)]) is not None
    assert kernels._native("optim_adam_step", [torch.zeros(3, dtype=torch.float64)]) is None
    assert kernels._native("optim_adam_step", [torch.zeros(3, 4).t()]) is None  # not contiguous
    with backends.use_backend("ref"):
        assert kernels._native("optim_adam_step", [torch.zeros(3)]) is None


def test_explicit_backend_that_cannot_serve_is_an_error():
    with backends.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        kernels.grad_stats([torch.zeros(3)])


@needs_native
def test_low_precision_state_runs_native_elementwise():
    """bf16 / int8 moments are decoded to fp32, stepped by the native kernel and re-encoded: the
    result is the spec's bit for bit."""
    stream = grad_stream(40, skip=False)
    out = {}
    for backend in ("ref", "cpu"):
        ps = [torch.nn.Parameter(torch.ones(s)) for s in [(16, 8), (8,), (300,)]]
        opt = StableSPAM(ps, **HP, state_dtype="int8")
        with backends.use_backend(backend):
            for row in stream:
                for p, g in zip(ps, row):
                    p.grad = g.clone()
                opt.step()
        out[backend] = [p.detach().clone() for p in ps]
    for a, b in zip(out["ref"], out["cpu"]):
        assert torch.equal(a, b)


def _cuda_native():
    return torch.cuda.is_available() and backends.why_unavailable("cuda", "optim_adam_step", "cuda") is None


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_native(), reason="no GPU, or lowbit._C_cuda without optimizer kernels")
def test_cuda_kernels_bit_exact_with_spec_on_cuda():
    """The spec run with torch on the GPU against csrc/cuda/optim.cu: statistics and the step."""
    gs = [g.cuda() for g in _tensors(SIZES)]
    gs[3][4] = float("nan")
    with backends.use_backend("ref"):
        ref = kernels.grad_stats(gs)
    with backends.use_backend("cuda"):
        got = kernels.grad_stats(gs)
    assert _same_stats(ref, got) and got.is_cuda
    table = _clip_table(ref[:, 0].cpu()).cuda()  # clip off for the NaN tensor: (0, 0), not read
    with backends.use_backend("ref"):
        ref_c = kernels.clip_stats(gs, table)
    with backends.use_backend("cuda"):
        got_c = kernels.clip_stats(gs, table)
    assert torch.equal(ref_c, got_c) and got_c.is_cuda
    assert torch.equal(got_c[table[:, 0] == 0], torch.zeros(4, 2, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="table: expected a .* on cuda"):
        kernels.clip_stats(gs, table.cpu())
    sizes = [n for n in SIZES if n]
    params, grads, ms, vs = (
        [t.cuda() for t in _tensors(sizes, s)] for s in (1, 2, 3, 4))
    vs = [v.abs() for v in vs]
    skip = [i % 4 == 2 for i in range(len(sizes))]
    grads = [torch.full_like(g, float("nan")) if s else g for g, s in zip(grads, skip)]
    scalars = _table([_scalars(i, clip=i % 2 == 0, zero=i % 3 == 0, skip=s) for i, s in enumerate(skip)]).cuda()
    a = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    b = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    with backends.use_backend("ref"):
        kernels.adam_step(a[0], grads, a[1], a[2], scalars)
    with backends.use_backend("cuda"):
        kernels.adam_step(b[0], grads, b[1], b[2], scalars)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert _same_bits(x, y)
    for ts, orig in zip(b, (params, ms, vs)):
        for t, o, s in zip(ts, orig, skip):
            assert _same_bits(t, o) == s
    with pytest.raises(RuntimeError, match=r"scalars: expected a \[9, 14\] fp64 tensor on cuda"):
        kernels.adam_step(b[0], grads, b[1], b[2], scalars.cpu())
    with pytest.raises(RuntimeError, match=r"scalars: expected a \[9, 14\] fp64 tensor, got"):
        kernels.adam_step(b[0], grads, b[1], b[2], scalars[:, :13])
