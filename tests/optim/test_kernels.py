"""The Stable-SPAM step kernels: the spec in lowbit/optim/kernels.py against an independent reading of
its definition, and every native backend against the spec, bit for bit (atol = 0) in fp32."""
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
    assert kernels.sumsq_spec(x) == sumsq_by_definition(x)


def _tensors(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))  # magnitudes over ~1e-5..1e5
        out.append(x)
    return out


# sizes crossing the native kernels' work-item boundaries (4096 rows of 16 for statistics, 2^15 for the step)
SIZES = [0, 1, 15, 16, 17, 4096 * 16 - 1, 4096 * 16 + 1, 3 * 4096 * 16 + 7, 2 ** 15 + 3, 200_000]


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
    assert ref[0] == got[0]  # max |g|, +inf for the two non-finite tensors
    assert [math.isfinite(a) for a in got[0]].count(False) == 2
    finite = [i for i, a in enumerate(ref[0]) if math.isfinite(a)]
    assert [ref[1][i] for i in finite] == [got[1][i] for i in finite]
    mh = [kernels.f32(0.3 * a) for a in ref[0]]
    r = [kernels.f32(0.25)] * len(gs)
    keep = [gs[i] for i in finite]
    with backends.use_backend("ref"):
        ref_c = kernels.clip_stats(keep, [mh[i] for i in finite], [r[i] for i in finite])
    with backends.use_backend(backend):
        got_c = kernels.clip_stats(keep, [mh[i] for i in finite], [r[i] for i in finite])
    assert ref_c == got_c and sum(got_c[1]) > 0


def _scalars(i, clip, zero):
    return random_scalars(100 + i, clip, zero)


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("threads", [1, 2])
def test_adam_step_bit_exact(backend, threads):
    sizes = [n for n in SIZES if n]
    params, grads, ms, vs = _tensors(sizes, 1), _tensors(sizes, 2), _tensors(sizes, 3), _tensors(sizes, 4)
    vs = [v.abs() for v in vs]
    scalars = [_scalars(i, clip=i % 2 == 0, zero=i % 3 == 0) for i in range(len(sizes))]
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
    with backends.use_backend("ref"):
        ref = kernels.grad_stats(gs)
    with backends.use_backend("cuda"):
        got = kernels.grad_stats(gs)
    assert ref == got
    mh = [kernels.f32(0.3 * a) for a in ref[0]]
    r = [kernels.f32(0.25)] * len(gs)
    with backends.use_backend("ref"):
        ref_c = kernels.clip_stats(gs, mh, r)
    with backends.use_backend("cuda"):
        got_c = kernels.clip_stats(gs, mh, r)
    assert ref_c == got_c
    sizes = [n for n in SIZES if n]
    params, grads, ms, vs = (
        [t.cuda() for t in _tensors(sizes, s)] for s in (1, 2, 3, 4))
    vs = [v.abs() for v in vs]
    scalars = [_scalars(i, clip=i % 2 == 0, zero=i % 3 == 0) for i in range(len(sizes))]
    a = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    b = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    with backends.use_backend("ref"):
        kernels.adam_step(a[0], grads, a[1], a[2], scalars)
    with backends.use_backend("cuda"):
        kernels.adam_step(b[0], grads, b[1], b[2], scalars)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)
