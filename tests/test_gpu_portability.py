"""What a run on one H100 would never show, checked on CPU with simulated GPUs and shapes too large
to allocate here:

* Build and probe: the default build covers every GPU from compute capability 8.0 on; an extension
  built for other archs reports itself unavailable on a GPU it holds no code for (8.0, 8.9, 12.0
  here), naming the GPU, its capability and the built archs, so ops fall to triton, then ref, with
  one warning.
* Triton launch grids, from each launcher's own plan function, stay inside CUDA's grid limits for
  R = 1 with K = 2^25, K = 16 with R = 2^25, and the largest attention shapes; every kernel's tiles
  fit the shared memory of the GPUs lowbit builds for.
* The fused optimizer step builds its device work table once per layout, not once per step.
* A GEMM path falls back only on PyTorch's documented "unsupported" refusal of its scaled_mm call
  (recorded for the process, warned once, the next path taken); an out-of-memory or any other error
  propagates unchanged and is not recorded.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import types
import warnings

import pytest
import torch

from lowbit import backends
from lowbit.backends import cuda as cuda_backend
from lowbit.backends import ref
from lowbit.backends.cuda import _native
from lowbit.backends.cuda import optim as cuda_optim
from lowbit.backends.triton import _limits
from lowbit.optim import StableSPAM, kernels

try:  # the launch-plan tests need Triton's helpers, not a GPU
    import triton
    from lowbit.backends.triton import (_amax, _attention_common, _cast, _dequantize, _gemm, _hadamard, _quantize,
                                        _quantize_dual)
except ImportError:
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = {(8, 0): "NVIDIA A100-SXM4-80GB", (8, 6): "NVIDIA RTX A6000", (8, 9): "NVIDIA L4",
        (9, 0): "NVIDIA H100 80GB HBM3", (10, 0): "NVIDIA B200", (10, 3): "NVIDIA B300",
        (12, 0): "NVIDIA GeForce RTX 5090", (12, 1): "NVIDIA GB10"}


def load_setup():
    spec = importlib.util.spec_from_file_location("lowbit_setup", os.path.join(REPO, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not as __main__: defines the helpers, builds nothing
    return mod


# ----------------------------------------------------------------------------- build targets
def test_default_build_serves_every_gpu_from_ampere_on():
    setup = load_setup()
    sass, ptx = setup.cuda_targets({}, [], None)
    assert sass == ["80", "89", "90a", "100a", "120a"] and ptx == ["80"]
    archs = setup.recorded_archs(sass, ptx).split("+")
    assert archs == ["sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120a", "compute_80"]
    for cap in GPUS:
        assert cuda_backend.runs_on(cap, archs), cap
    assert setup.gencode_flags(["90a"], ["90"]) == ["-gencode=arch=compute_90a,code=sm_90a",
                                                    "-gencode=arch=compute_90,code=compute_90"]


def test_build_honours_the_arch_lists_and_the_visible_gpus():
    setup = load_setup()
    assert setup.cuda_targets({"TORCH_CUDA_ARCH_LIST": "8.6;9.0a"}, [(8, 0)], None) == (["86", "90a"], ["86"])
    assert setup.cuda_targets({"TORCH_CUDA_ARCH_LIST": "8.0 12.0a+PTX"}, [], None) == (["80", "120a"], ["80", "120a"])
    assert setup.cuda_targets({"LOWBIT_CUDA_ARCHS": "100a", "TORCH_CUDA_ARCH_LIST": "8.0"}, [], None) == (["100a"], ["100"])
    assert setup.cuda_targets({}, [(9, 0), (8, 9), (9, 0)], None) == (["89", "90a"], ["89"])
    # an nvcc too old for Blackwell builds the rest of the default list
    assert setup.cuda_targets({}, [], {"80", "86", "89", "90"}) == (["80", "89", "90a"], ["80"])
    with pytest.raises(ValueError, match="Hopper"):
        setup.parse_archs("Hopper")


@pytest.mark.parametrize("cap, archs, runs", [
    ((8, 0), "sm_90a sm_100a", False), ((8, 9), "sm_90a sm_100a", False), ((12, 0), "sm_90a sm_100a", False),
    ((10, 3), "sm_90a sm_100a", False),  # "a" code runs on exactly its arch, not the B300
    ((9, 0), "sm_90a sm_100a", True), ((10, 0), "sm_90a sm_100a", True),
    ((8, 9), "sm_80", True), ((8, 0), "sm_89", False), ((9, 0), "sm_80", False),  # SASS: same major, minor >= its
    ((12, 0), "sm_80 compute_80", True), ((7, 5), "compute_80", False),  # PTX: any capability from its own on
    ((10, 0), "compute_90a", False), ((10, 3), "sm_100f", True), ((12, 0), "sm_100f", False),
])
def test_compatibility_rules(cap, archs, runs):
    assert cuda_backend.runs_on(cap, archs.split()) is runs


# ----------------------------------------------------------------------------- probe and fallback
@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen capability and an extension built for chosen archs, on CPU."""
    def make(cap, archs):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPUS[cap])
        monkeypatch.setattr(_native, "_C", types.SimpleNamespace(archs=lambda: archs))
        monkeypatch.setattr(cuda_backend, "_PROBED", {})
    return make


def lowbit_warnings(record) -> list:
    return [w for w in record if "lowbit._C_cuda holds no code" in str(w.message)]


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (12, 0)])
def test_cuda_backend_steps_aside_on_a_gpu_it_was_not_built_for(fake_gpu, cap):
    fake_gpu(cap, "sm_90a+sm_100a")  # the old default: SASS for H100 and B200 only, no PTX
    fallback = "triton" if backends.why_unavailable("triton", "quantize", "cuda") is None else "ref"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        reason = backends.why_unavailable("cuda", "quantize", "cuda")
        for op in ("quantize", "dequantize", "cast", "hadamard", "quantize"):
            assert backends.resolve(op, "cuda") == fallback
        from lowbit import env
        report = env.report()
    assert GPUS[cap] in reason and f"{cap[0]}.{cap[1]}" in reason and "sm_90a, sm_100a" in reason
    assert f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}" in reason
    assert len(lowbit_warnings(record)) == 1  # once, however often the registry asks
    assert reason in report  # python -m lowbit.env says why


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (12, 0)])
def test_cuda_backend_serves_a_gpu_its_build_covers(fake_gpu, cap):
    fake_gpu(cap, "sm_80+sm_90a+sm_100a+compute_80")  # 8.9 runs sm_80, 12.0 JIT-compiles compute_80
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cuda_backend.unavailable() is None
        assert backends.resolve("quantize", "cuda") == "cuda"
    assert not lowbit_warnings(record)


def test_an_extension_that_does_not_record_its_archs_is_trusted(fake_gpu):
    fake_gpu((8, 9), "")
    assert cuda_backend.unavailable() is None


# ----------------------------------------------------------------------------- Triton launch grids
TALL, WIDE = (2**25, 16), (1, 2**25)


def fits(grid) -> bool:
    return 1 <= len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, _limits.MAX_GRID))


@needs_triton
@pytest.mark.parametrize("R, K, block", [
    (*WIDE, (1, 32)), (*WIDE, (1, 16)), (*WIDE, (1, 128)), (*WIDE, (1, 2**25)),
    (1, 3 * 2**23, (1, 96)),  # blocks that are no power of two: the slab kernel, one program column per block
    (*TALL, (1, 16)), (*TALL, (16, 16)), (*TALL, (2**25, 16)), (2**25, 48, (1, 48)),
    (2**13, 2**13, (128, 128)), (2**15, 2**15, (1, 32)),
])
def test_quantize_and_dequantize_grids_fit_any_shape(R, K, block):
    tiles, grid, (t0, t1) = _amax.launch_plan(R, K, *block)
    assert fits(grid), ("amax", grid)
    assert grid[0] * (t0 * block[0] if tiles else t0) * (t1 * block[1] if tiles else block[1]) >= R * K
    n_blocks = (R // block[0]) * (K // block[1])
    assert fits(_quantize.scale_grid(n_blocks))
    for plan in (_quantize.encode_plan, _dequantize.launch_plan):
        grid, tr, tk = plan(R, K)
        assert fits(grid) and grid[0] * tr * tk >= R * K, (plan.__module__, grid)


@needs_triton
@pytest.mark.parametrize("R, K", [WIDE, TALL, (2**16, 2**15)])
def test_elementwise_and_hadamard_grids_fit_any_shape(R, K):
    for on_gpu in (True, False):
        grid, block = _cast.launch_plan(R * K, on_gpu)
        assert fits(grid) and grid[0] * block >= R * K
    for block in (16, 256, 2**15):
        if K % block == 0:
            for mid, lines, grid in _hadamard.launch_plan(R * K, block):
                assert fits(grid) and grid[0] * lines * mid >= R * K


@needs_triton
@pytest.mark.parametrize("T, K", [WIDE, TALL, (2**16, 2**15)])
def test_quantize_dual_grid_fits_any_shape(T, K):
    """Both passes of the fused dual-layout quantizer tile the source onto axis 0 alone."""
    spec = types.SimpleNamespace(hadamard=0, rows=T, block=(1, 16))
    tiles = _quantize_dual.plan(T, K, spec, spec)
    assert tiles is not None
    tr, tk = tiles
    grid = _quantize_dual.launch_plan(T, K, tr, tk)
    assert fits(grid) and grid[0] * tr * tk >= T * K


@needs_triton
@pytest.mark.parametrize("M, N, K", [(1, 2**16, 2**25), (2**25, 16, 16), (2**25, 2**14, 64), (2**16, 2**16, 2**16)])
def test_gemm_grid_fits_any_shape(M, N, K):
    grid, bm, bn, bk = _gemm.launch_plan(M, N, K, _gemm.BK_MAX)
    assert fits(grid) and grid[0] * bm * bn >= M * N and bk <= _gemm.BK_MAX


ATTENTION_SHAPES = [  # (batch, heads, seq, head_dim): the old grid put batch * heads on axis 1
    (1, 64, 2**20, 128), (2**12, 64, 256, 64), (2**10, 128, 4096, 128), (1, 1, 2**24, 64)]


@needs_triton
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("block_size", [16, 64, 128, 256])
def test_attention_grid_fits_the_largest_shapes(shape, block_size):
    B, H, S, D = shape
    for esize in (2, 4):
        for smem in _limits.SMEM_OPTIN.values():
            grid, meta = _attention_common.launch_plan(B, H, S, D, D, block_size, esize, smem)
            assert fits(grid), grid
            assert grid[0] * meta["BM"] >= B * H * S  # every query row has a program


# ----------------------------------------------------------------------------- shared memory
def test_build_targets_and_shared_memory_table_agree():
    setup = load_setup()
    assert sorted(_limits.SMEM_OPTIN) == sorted(f"sm_{a}" for a in setup.cuda_targets({}, [], None)[0])


@needs_triton
@pytest.mark.parametrize("gpu", sorted(_limits.SMEM_OPTIN))
def test_attention_tiles_fit_shared_memory(gpu):
    limit = _limits.SMEM_OPTIN[gpu]
    for block_size in (16, 32, 64, 128, 256):
        for d, dv in ((16, 16), (64, 64), (96, 96), (128, 128), (256, 256), (128, 64)):
            for esize in (2, 4):
                bm, bn, stages = _attention_common.tiles(block_size, d, dv, esize, limit)
                bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
                assert _attention_common.smem_bytes(bm, bn, bd, bdv, esize, stages) <= limit
                assert block_size % bm == 0 and block_size % bn == 0 and min(bm, bn) >= 16
    with pytest.raises(ValueError, match="shared memory"):
        _attention_common.tiles(256, 4096, 4096, 4, limit)


@needs_triton
def test_fixed_tiles_fit_the_smallest_shared_memory():
    for mod in (_amax, _cast, _dequantize, _hadamard, _quantize, _gemm):
        assert mod.smem_bytes() <= _limits.SMEM_MIN, mod.__name__


@pytest.mark.triton
@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("block_size", [64, 128])
def test_attention_split_into_tiles_matches_ref(block_size):
    """Query blocks over several programs (the pooled map's atomic max) and key blocks over several tiles."""
    from lowbit.attention import attention_with_block_pool, block_sparse_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    B, H, Hk, S, D = 1, 2, 1, 2 * block_size + 9, 32
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dev) for h in (H, Hk, Hk))
    n = -(-S // block_size)
    mask = (torch.rand(B, H, n, n, generator=g) < 0.5).to(dev)
    for causal in (True, False):
        out, pooled = attention_with_block_pool(q, k, v, block_size, causal, backend="triton")
        ref_out, ref_pooled = attention_with_block_pool(q, k, v, block_size, causal, backend="ref")
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)
        out = block_sparse_attention(q, k, v, mask, block_size, causal, backend="triton")
        torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask, block_size, causal, backend="ref"),
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- optimizer work table
class FakeOptimExtension:
    """lowbit._C_cuda's optimizer entry points on CPU tensors: the step runs the spec; layouts are counted."""

    def __init__(self):
        self.layouts = []
        self.used = []

    def optim_step_layout(self, numels, like):
        self.layouts.append(tuple(numels))
        return object()

    def optim_adam_step(self, params, grads, ms, vs, scalars, layout):
        self.used.append(layout)
        assert scalars.device == params[0].device and scalars.shape == (len(params), len(ref.optim.SCALARS))
        ref.optim.adam_step(params, grads, ms, vs, scalars)


def run_steps(monkeypatch, steps: int, with_fake: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = StableSPAM(model.parameters(), lr=1e-2)
    x = torch.randn(32, 8)
    native = kernels._native
    with monkeypatch.context() as m:
        if with_fake:  # the CUDA backend's step for the optimizer's fp32 tensors
            m.setattr(kernels, "_native", lambda op, tensors, fp32=True:
                      cuda_optim.adam_step if op == "optim_adam_step" else native(op, tensors, fp32))
        for _ in range(steps):
            opt.zero_grad()  # grads are new tensors every step: the table must not depend on them
            model(x).square().mean().backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_step_builds_its_work_table_once_per_layout(monkeypatch):
    fake = FakeOptimExtension()
    monkeypatch.setattr(_native, "_C", fake)
    monkeypatch.setattr(cuda_optim, "_layouts", {})
    got = run_steps(monkeypatch, 4, with_fake=True)
    assert fake.layouts == [(128, 16, 64, 4)]  # built on the first step only
    assert len(fake.used) == 4 and all(t is fake.used[0] for t in fake.used)
    want = run_steps(monkeypatch, 4, with_fake=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # another layout gets its own table; the first one is still reused
    p = [torch.zeros(3), torch.zeros(70000)]
    cuda_optim.adam_step(p, p, p, p, torch.zeros(2, len(ref.optim.SCALARS), dtype=torch.float64))
    assert fake.layouts[-1] == (3, 70000) and len(fake.layouts) == 2


def test_piece_table_of_the_fused_low_precision_step_is_reused(monkeypatch):
    monkeypatch.setattr(kernels, "_piece_tables", {})
    a = kernels.piece_table([(0, 0, 5), (1, 0, 7)])
    assert kernels.piece_table([(0, 0, 5), (1, 0, 7)]) is a
    assert a.tolist() == [[0, 0, 5], [1, 0, 7]] and a.dtype == torch.int64
    assert kernels.piece_table([(0, 0, 6)]) is not a
    if backends.why_unavailable("cpu", "optim_lowprec_step", "cpu") is None:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = StableSPAM(model.parameters(), lr=1e-2, state_dtype="bf16")
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
        assert len(kernels._piece_tables) == 3  # the two above, and one for the model's layout



# ----------------------------------------------------------------------------- scaled_mm refusals
class FakeScaledMM:
    """Stands in for `cuda.scaled_mm.scaled_mm`: raises `exc` on every call and counts the calls."""

    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    def __call__(self, plan, a, b, out_dtype):
        self.calls += 1
        raise self.exc


@pytest.fixture
def gemm_on(monkeypatch):
    """The CUDA qmatmul on CPU tensors: a fake sm_89 (FP8 tensor-wise runs scaled_mm there), a fake
    scaled_mm, and the two later paths made observable (Triton records its calls; dequant runs ref's)."""
    import lowbit
    from lowbit.backends import gemm

    # modules, not the same-named functions their packages export
    mod = importlib.import_module("lowbit.backends.cuda.qmatmul")
    ref_quantize = importlib.import_module("lowbit.backends.ref.quantize")
    triton_mod = importlib.import_module("lowbit.backends.triton.qmatmul")

    def make(exc, triton_ok=True):
        fake = FakeScaledMM(exc)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
        monkeypatch.setattr(mod, "scaled_mm", fake)
        monkeypatch.setattr(mod, "_WARNED", set())
        monkeypatch.setattr(mod, "_REFUSED", {})
        monkeypatch.setattr(mod, "dequantize", ref_quantize.dequantize)
        real = gemm.detect()
        monkeypatch.setattr(gemm, "detect", lambda: dataclasses.replace(
            real, triton=None if triton_ok else "not installed", f_scaled_mm=True, v1_scaled_mm=True,
            scalings=real.scalings | {"TensorWise"}))
        triton_calls = []
        monkeypatch.setattr(triton_mod, "qmatmul", lambda a, b, out_dtype: triton_calls.append(out_dtype) or
                            torch.full((a.data.shape[0], b.data.shape[0]), 7.0, dtype=out_dtype))
        g = torch.Generator().manual_seed(0)
        qa, qb = (lowbit.quantize(torch.randn(r, 64, generator=g), "fp8_e4m3", backend="ref") for r in (32, 16))
        want = lowbit.qmatmul(qa, qb, out_dtype=torch.float32, backend="ref")
        return mod, fake, triton_calls, qa.parts(), qb.parts(), want
    return make


def test_gemm_plan_is_scaled_mm_for_the_fake_gpu(gemm_on):
    from lowbit.backends import gemm

    mod, fake, _, a, b, _ = gemm_on(RuntimeError("x"))
    assert gemm.plan_for(a, b, torch.float32, (8, 9)).path == "scaled_mm"  # the premise of the tests below


def test_out_of_memory_in_scaled_mm_propagates_unchanged(gemm_on):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)")
    mod, fake, triton_calls, a, b, _ = gemm_on(oom)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for call in (1, 2):
            with pytest.raises(torch.OutOfMemoryError) as got:
                mod.qmatmul(a, b, torch.float32)
            assert got.value is oom and fake.calls == call  # the same object; the next call tries scaled_mm again
    assert not [w for w in record if "lowbit" in str(w.message)]
    assert mod._REFUSED == {} and triton_calls == []


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("Invalid scaling configuration.\n- For TensorWise scaling, a and b should be float8"),
    ValueError("scale_a must have 1 Float element"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasLtMatmul with transpose_mat1 1"),
], ids=["cuda-fault", "bad-layout", "bad-scale", "cublas-execution-failed"])
def test_other_errors_in_scaled_mm_propagate_unchanged(gemm_on, exc):
    mod, fake, triton_calls, a, b, _ = gemm_on(exc)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for call in (1, 2):
            with pytest.raises(type(exc)) as got:
                mod.qmatmul(a, b, torch.float32)
            assert got.value is exc and fake.calls == call
    assert not [w for w in record if "lowbit" in str(w.message)]
    assert mod._REFUSED == {} and triton_calls == []


@pytest.mark.parametrize("triton_ok", [True, False], ids=["to-triton", "to-dequant"])
def test_an_unsupported_refusal_falls_back_once_and_is_remembered(gemm_on, triton_ok):
    refusal = RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `CUBLAS_STATUS_NOT_SUPPORTED`")
    mod, fake, triton_calls, a, b, want = gemm_on(refusal, triton_ok)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [mod.qmatmul(a, b, torch.float32) for _ in range(2)]
    assert fake.calls == 1  # the second call goes straight to the next path
    warned = [str(w.message) for w in record if "lowbit qmatmul" in str(w.message)]
    assert len(warned) == 1, warned
    assert "fp8_e4m3 tensor x fp8_e4m3 tensor" in warned[0] and "sm_89" in warned[0]
    assert "CUBLAS_STATUS_NOT_SUPPORTED" in warned[0] and ("triton" if triton_ok else "dequant") in warned[0]
    if triton_ok:
        assert triton_calls == [torch.float32, torch.float32]
        assert all(torch.equal(o, torch.full_like(want, 7.0)) for o in outs)
    else:
        assert triton_calls == []
        for o in outs:  # dequantize + fp32 mm: ref's GEMM up to the order of a 64-term fp32 sum
            torch.testing.assert_close(o, want, rtol=1e-6, atol=1e-5)
    assert list(mod._REFUSED.values()) == [str(refusal)]


def test_other_combinations_are_not_marked_refused(gemm_on):
    """The record is per (format pair, layouts, output dtype, capability): another output dtype tries again."""
    refusal = NotImplementedError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 "
                                  "or 8.9, or ROCm MI300+")
    mod, fake, triton_calls, a, b, _ = gemm_on(refusal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod.qmatmul(a, b, torch.float32)
        mod.qmatmul(a, b, torch.bfloat16)
    assert fake.calls == 2 and triton_calls == [torch.float32, torch.bfloat16]


def test_every_documented_refusal_is_recognised_and_nothing_else():
    from lowbit.backends.cuda import scaled_mm as S

    for cls, message in S.UNSUPPORTED:
        for raised in {cls, NotImplementedError} if cls is RuntimeError else {cls}:
            assert S.unsupported(raised(message + " (details)")) == message + " (details)", (raised, message)
    assert S.unsupported(torch.OutOfMemoryError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling x")) is None
    assert S.unsupported(TypeError("Rowwise scaling is not currently supported on your device")) is None
    assert S.unsupported(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasLtMatmul")) is None
    assert S.unsupported(ValueError("Rowwise scaling is not currently supported on your device")) is None
