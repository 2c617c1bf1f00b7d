"""The GEMM dispatch table (lowbit.backends.gemm) per compute capability, the scaled_mm arguments it
leads to (lowbit.backends.cuda.scaled_mm: layouts checked as PyTorch's ScaledBlas.cpp checks them,
then emulated on CPU against the reference GEMM), the CUDA qmatmul's use of the plan, and
`python -m lowbit.env --gemm`. Nothing here needs a GPU."""
import dataclasses
import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import lowbit
from lowbit.backends import gemm
from lowbit.backends import scale_layout as L
from lowbit.backends.cuda import scaled_mm as S
from lowbit.bits import unpack_fp4
from lowbit.nn.recipe import RECIPES

ref = importlib.import_module("lowbit.backends.ref.quantize")  # the package's `quantize` attribute is the op

ALL_SCALINGS = frozenset({"TensorWise", "RowWise", "BlockWise1x16", "BlockWise1x32", "BlockWise1x128",
                          "BlockWise128x128"})
# torch 2.11 built with CUDA 12.9 and Triton: what the GPU machines run
FEAT = gemm.Features(torch=(2, 11), cuda=(12, 9), f_scaled_mm=True, v1_scaled_mm=True, scalings=ALL_SCALINGS,
                     swizzles=frozenset({"NO_SWIZZLE", "SWIZZLE_32_4_4"}), triton=None)
V1 = dataclasses.replace(FEAT, f_scaled_mm=False, scalings=frozenset(), swizzles=frozenset())
S_, T_, D_ = "scaled_mm", "triton", "dequant"
CAPS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
FP8_TW = dict.fromkeys(CAPS[:2], (T_,) * 3) | dict.fromkeys(CAPS[2:], (S_,) * 3)
EXPECTED = {  # recipe: {capability: (fprop, dgrad, wgrad)}, bf16 output
    "fp8-tensorwise": FP8_TW,
    "fp8-rowwise": FP8_TW,
    "fp8-blockwise": dict.fromkeys(CAPS, (T_,) * 3) | {"9.0": (S_,) * 3},
    "mxfp8": dict.fromkeys(CAPS, (T_,) * 3) | {"10.0": (S_,) * 3, "12.0": (S_,) * 3},
    "mxfp4": dict.fromkeys(CAPS, (T_,) * 3) | {"10.0": (S_,) * 3},
    "nvfp4": dict.fromkeys(CAPS, (T_,) * 3) | {"10.0": (S_,) * 3, "12.0": (S_,) * 3},
    "fp4-dge": dict.fromkeys(CAPS[:2], (T_,) * 3) | dict.fromkeys(("8.9", "9.0"), (T_, S_, S_))
    | {"10.0": (S_,) * 3, "12.0": (S_,) * 3},
    "int4": dict.fromkeys(CAPS, (D_,)),  # fprop only: dgrad and wgrad run in high precision
}


@pytest.mark.parametrize("cap", CAPS)
def test_every_recipe_gemm_has_the_expected_path_and_a_reason(cap):
    rows = gemm.table(RECIPES.values(), cap, FEAT)
    assert {r[0] for r in rows} == set(RECIPES)
    got = {}
    for recipe, name, _, _, plan in rows:
        if plan is None:
            assert recipe in ("bf16", "int4")
            continue
        assert plan.path in gemm.PATHS and plan.reason
        if plan.path == "scaled_mm":
            assert plan.api in ("F.scaled_mm", "torch._scaled_mm") and all(s in ALL_SCALINGS for s in plan.scaling)
        got.setdefault(recipe, []).append(plan.path)
    assert {k: tuple(v) for k, v in got.items()} == {k: v[cap] for k, v in EXPECTED.items()}


def _choose(fa, ta, fb, tb, cap="9.0", out=torch.bfloat16, features=FEAT, shape=None):
    return gemm.choose(fa, ta, fb, tb, out, cap, features, shape)


T, ROW = (None, None), (1, None)


def test_fp8_rules():
    assert "E5M2 x E5M2" in _choose("fp8_e5m2", T, "fp8_e5m2", T).reason
    assert _choose("fp8_e5m2", T, "fp8_e5m2", T).path == "triton"
    assert _choose("fp8_e4m3", ROW, "fp8_e5m2", ROW).swap and not _choose("fp8_e5m2", ROW, "fp8_e4m3", ROW).swap
    mixed = _choose("fp8_e4m3", T, "fp8_e4m3", ROW)
    assert mixed.scaling == ("RowWise", "RowWise") and "repeated per row" in mixed.reason
    assert _choose("fp8_e4m3", (128, 128), "fp8_e4m3", (128, 128)).scaling == ("BlockWise1x128", "BlockWise128x128")
    assert _choose("fp8_e4m3", (128, 128), "fp8_e4m3", ROW).scaling == ("BlockWise128x128", "BlockWise1x128")
    assert _choose("fp8_e4m3", (1, 16), "fp8_e4m3", (1, 16)).path == "triton"
    assert "E4M3 x E4M3" in _choose("fp8_e4m3", (1, 128), "fp8_e5m2", (1, 128)).reason
    assert "sm_90 only" in _choose("fp8_e4m3", (1, 128), "fp8_e4m3", (1, 128), cap="10.0").reason


def test_row_wise_output_dtypes_follow_the_kernel():
    def path(cap, out, features=FEAT):
        return _choose("fp8_e4m3", ROW, "fp8_e4m3", ROW, cap, out, features).path

    assert path("9.0", torch.float32) == "scaled_mm"  # cuBLASLt outer-vector scales
    assert path("9.0", torch.float32, gemm.with_cuda(FEAT, "12.8")) == "triton"  # CUTLASS: no fp32 out
    assert path("8.9", torch.float32) == path("10.0", torch.float32) == "triton"
    assert path("10.0", torch.float16) == "scaled_mm"
    assert path("10.0", torch.float16, dataclasses.replace(FEAT, torch=(2, 9))) == "triton"
    assert "CUTLASS" in _choose("fp8_e4m3", ROW, "fp8_e4m3", ROW, "8.9", torch.float32).reason


def test_shapes_output_dtypes_and_capabilities_are_reasons():
    p = _choose("fp8_e4m3", T, "fp8_e4m3", T, shape=(24, 32, 64))
    assert p.path == "triton" and "multiples of 16" in p.reason
    assert _choose("fp8_e4m3", T, "fp8_e4m3", T, shape=(32, 32, 64)).path == "scaled_mm"
    assert _choose("fp8_e4m3", T, "fp8_e4m3", T, out=torch.float64).path == "triton"
    p = _choose("mxfp8", (1, 32), "mxfp8", (1, 32), cap="7.5")
    assert p.path == "dequant" and "sm_80" in p.reason
    no_triton = dataclasses.replace(FEAT, triton="triton is not importable")
    p = _choose("mxfp8", (1, 32), "mxfp8", (1, 32), features=no_triton)
    assert p.path == "dequant" and "triton is not importable" in p.reason
    assert _choose("mxfp8_e5m2", (1, 32), "mxfp8_e5m2", (1, 32), cap="10.0").path == "triton"
    assert _choose("mxfp8", (1, 32), "fp8_e4m3", T, cap="10.0").path == "triton"
    assert _choose("mxfp8", (1, 32), "mxfp4", (1, 32), cap="10.0").path == "triton"


def test_older_torch_without_functional_scaled_mm():
    assert _choose("fp8_e4m3", T, "fp8_e4m3", T, features=V1).api == "torch._scaled_mm"
    assert "torch.nn.functional.scaled_mm" in _choose("fp8_e4m3", (1, 128), "fp8_e4m3", (1, 128), features=V1).reason
    nv = _choose("nvfp4", (1, 16), "nvfp4", (16, 16), cap="10.0", features=V1)
    assert nv.api == "torch._scaled_mm" and "fp32 result" in nv.reason
    assert _choose("mxfp4", (1, 32), "mxfp4", (1, 32), cap="10.0").api == "torch._scaled_mm"


def test_capability_parsing_and_tiles():
    assert gemm.capability_of("12.0") == gemm.capability_of(12.0) == gemm.capability_of((12, 0)) == (12, 0)
    assert gemm.capability_of("8.9") == (8, 9)
    x = torch.randn(128, 256)  # one row of 128x128 tiles: still tiles, not the whole tensor
    for block, tile in ((None, T), ("row", ROW), ((1, 128), (1, 128)), ((128, 128), (128, 128))):
        assert gemm.tile_of(lowbit.quantize(x, "fp8_e4m3", block=block, backend="ref").parts()) == tile
    assert gemm.tile_of(lowbit.quantize(x[:32], "nvfp4", block=(16, 16), backend="ref").parts()) == (16, 16)


# ----------------------------------------------------------------------------- scaled_mm arguments
def _q(rows, K, fmt, block, seed):
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed))
    return lowbit.quantize(x, fmt, block=block, backend="ref")


def _decode(mat):
    if mat.dtype == torch.float4_e2m1fn_x2:
        return ref.decode_fp4(unpack_fp4(mat.contiguous().view(torch.uint8))).double()
    return mat.double()


def _element_scales(scale, name, R, K):
    """[R, K] fp64 scale of each element, read the way the CUDA kernels read `scale`."""
    if name == "TensorWise":
        return scale.double().reshape(1, 1).expand(R, K)
    if name == "RowWise":
        return scale.double().reshape(R, 1).expand(R, K)
    if name == "BlockWise1x128":
        return scale.double().repeat_interleave(128, 1)
    if name == "BlockWise128x128":
        return scale.double().t()[:, :K // 128].repeat_interleave(128, 0).repeat_interleave(128, 1)
    if name == "BlockWise1x32":
        e = L.unswizzle(scale, R, K // 32).view(torch.uint8).double()
        return torch.pow(2.0, e - 127).repeat_interleave(32, 1)
    return L.unswizzle(scale, R, K // 16).double().repeat_interleave(16, 1)


def _check_layout(scale, name, R, K):
    """PyTorch's acceptance checks (aten/src/ATen/native/cuda/ScaledBlas.cpp) for one operand."""
    if name == "TensorWise":
        assert scale.numel() == 1 and scale.dtype == torch.float32
    elif name == "RowWise":
        assert scale.numel() == R and scale.dtype == torch.float32 and scale.is_contiguous()
    elif name == "BlockWise1x128":
        assert scale.shape == (R, K // 128) and scale.stride(0) == 1 and (scale.stride(1) == R or K == 128)
    elif name == "BlockWise128x128":
        L4 = -(-K // 512) * 4
        assert scale.shape == (L4, R // 128) and scale.stride(0) == 1 and (scale.stride(1) == L4 or R == 128)
    else:
        bs, dtype = (32, torch.float8_e8m0fnu) if name == "BlockWise1x32" else (16, torch.float8_e4m3fn)
        assert scale.dtype == dtype and scale.is_contiguous() and scale.numel() == L.swizzled_numel(R, K // bs)


CASES = [  # fmt_a, block_a, fmt_b, block_b, M, N, K, capability, features
    ("fp8_e4m3", None, "fp8_e4m3", None, 32, 48, 64, "9.0", FEAT),
    ("fp8_e4m3", "row", "fp8_e5m2", "row", 32, 48, 64, "9.0", FEAT),
    ("fp8_e4m3", None, "fp8_e4m3", "row", 32, 48, 64, "9.0", V1),
    ("fp8_e4m3", (1, 128), "fp8_e4m3", (128, 128), 32, 256, 384, "9.0", FEAT),
    ("fp8_e4m3", (1, 128), "fp8_e4m3", (1, 128), 48, 32, 256, "9.0", FEAT),
    ("fp8_e4m3", (128, 128), "fp8_e4m3", (1, 128), 128, 16, 640, "9.0", FEAT),
    ("fp8_e4m3", (128, 128), "fp8_e4m3", (128, 128), 128, 256, 256, "9.0", FEAT),
    ("fp8_e4m3", "row", "fp8_e4m3", (1, 128), 32, 16, 256, "9.0", FEAT),
    ("mxfp8", None, "mxfp8", None, 48, 160, 96, "10.0", FEAT),
    ("mxfp8", None, "mxfp8", None, 16, 32, 64, "12.0", V1),
    ("mxfp4", None, "mxfp4", None, 144, 32, 160, "10.0", FEAT),
    ("nvfp4", (1, 16), "nvfp4", (16, 16), 48, 32, 80, "10.0", FEAT),
    ("nvfp4", (1, 16), "nvfp4", (1, 16), 16, 48, 64, "12.0", V1),
]


@pytest.mark.parametrize("fa,ba,fb,bb,M,N,K,cap,features", CASES)
def test_scaled_mm_arguments_have_the_layouts_pytorch_checks_and_compute_the_product(fa, ba, fb, bb, M, N, K, cap,
                                                                                       features):
    qa, qb = _q(M, K, fa, ba, M + K), _q(N, K, fb, bb, N + 2 * K)
    a, b = qa.parts(), qb.parts()
    plan = gemm.plan_for(a, b, torch.bfloat16, cap, features)
    assert plan.path == "scaled_mm", plan.reason
    call = S.build(plan, a, b, torch.bfloat16)
    assert call.fn == plan.api and call.swap == plan.swap
    out_kw = "output_dtype" if call.fn == "F.scaled_mm" else "out_dtype"
    assert call.kwargs[out_kw] == (torch.float32 if call.post_scale is not None else torch.bfloat16)
    if plan.swap:
        M, N = N, M
    ma, mb = call.mat_a, call.mat_b
    assert ma.is_contiguous() and mb.t().is_contiguous()  # row-major [M, K] times column-major [K, N]
    kpack = 2 if fa in ("mxfp4", "nvfp4") else 1
    assert ma.shape == (M, K // kpack) and mb.shape == (K // kpack, N)
    kw = call.kwargs
    sa, sb = kw["scale_a"], kw["scale_b"]
    if fa == "nvfp4" and call.fn == "F.scaled_mm":  # [block scales, 1 / global encode scale]
        assert [r.name for r in kw["scale_recipe_a"]] == ["BlockWise1x16", "TensorWise"]
        assert [s.name for s in kw["swizzle_b"]] == ["SWIZZLE_32_4_4", "NO_SWIZZLE"]
        (sa, ga), (sb, gb) = sa, sb
        assert ga.dtype == gb.dtype == torch.float32 and ga.numel() == gb.numel() == 1
        extra = float(ga) * float(gb)
    else:
        extra = float(call.post_scale) if call.post_scale is not None else 1.0
        if call.fn == "F.scaled_mm":
            assert (kw["scale_recipe_a"].name, kw["scale_recipe_b"].name) == plan.scaling
            if plan.scaling[0] in ("BlockWise1x32", "BlockWise1x16"):
                assert kw["swizzle_a"].name == kw["swizzle_b"].name == "SWIZZLE_32_4_4"
    assert kw["use_fast_accum"] is False
    if plan.scaling[1] == "RowWise":
        assert sb.shape == (1, N)  # the CUTLASS kernel's check
    _check_layout(sa, plan.scaling[0], M, K)
    _check_layout(sb, plan.scaling[1], N, K)
    A = _decode(ma) * _element_scales(sa, plan.scaling[0], M, K)
    B = _decode(mb.t()) * _element_scales(sb, plan.scaling[1], N, K)
    got = (A @ B.t()) * extra
    if call.swap:
        got = got.t()
    want = lowbit.qmatmul(qa, qb, out_dtype=torch.float64, backend="ref")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("fp8") and c[1] in (None, "row")
                                  and c[3] in (None, "row")])
def test_tensor_and_row_wise_calls_run_on_cpu(case):
    fa, ba, fb, bb, M, N, K, cap, features = case
    qa, qb = _q(M, K, fa, ba, 3), _q(N, K, fb, bb, 4)
    plan = gemm.plan_for(qa.parts(), qb.parts(), torch.float32, cap, features)
    try:
        got = S.scaled_mm(plan, qa.parts(), qb.parts(), torch.float32)
    except (RuntimeError, NotImplementedError) as exc:  # CPU scaled_mm kernels are a bonus, not a promise
        pytest.skip(f"scaled_mm on CPU: {exc}")
    want = lowbit.qmatmul(qa, qb, out_dtype=torch.float32, backend="ref")
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- the CUDA qmatmul uses the plan
def test_cuda_qmatmul_runs_the_planned_path(monkeypatch):
    mod = importlib.import_module("lowbit.backends.cuda.qmatmul")
    triton_mod = importlib.import_module("lowbit.backends.triton.qmatmul")
    monkeypatch.setattr(mod, "dequantize", ref.dequantize)
    monkeypatch.setattr(mod, "_WARNED", set())
    monkeypatch.setattr(triton_mod, "qmatmul", lambda a, b, out_dtype: "triton ran")
    cap = [(7, 5)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    qa, qb = _q(32, 64, "mxfp8", None, 1), _q(16, 64, "mxfp8", None, 2)
    want = lowbit.qmatmul(qa, qb, out_dtype=torch.float32, backend="ref")
    with pytest.warns(RuntimeWarning, match="mxfp8 1x32 x mxfp8 1x32 dequantizes.*sm_80"):
        assert torch.allclose(mod.qmatmul(qa.parts(), qb.parts(), torch.float32), want, rtol=1e-6, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per format pair and reason
        mod.qmatmul(qa.parts(), qb.parts(), torch.float32)
    cap[0] = (9, 0)
    assert mod.qmatmul(qa.parts(), qb.parts(), torch.float32) == "triton ran"
    fa, fb = _q(32, 64, "fp8_e4m3", None, 1), _q(16, 64, "fp8_e4m3", None, 2)
    if gemm.detect().f_scaled_mm or gemm.detect().v1_scaled_mm:
        try:
            got = mod.qmatmul(fa.parts(), fb.parts(), torch.float32)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"scaled_mm on CPU: {exc}")
        assert torch.allclose(got, lowbit.qmatmul(fa, fb, out_dtype=torch.float32, backend="ref"), atol=1e-4)


# ----------------------------------------------------------------------------- python -m lowbit.env --gemm
@pytest.mark.parametrize("cap", CAPS)
def test_gemm_report_lists_every_recipe_and_gemm(cap):
    from lowbit.env import gemm_report

    text = gemm_report(cap)
    assert text.startswith(f"GEMM paths on sm_{cap.replace('.', '')}")
    for name in RECIPES:
        assert f"\n{name}\n" in text
    paths = [ln.split("->")[1].split()[0] for ln in text.splitlines() if "->" in ln]
    quantized = sum(r.gemm(g)[0] is not None for r in RECIPES.values() for g in gemm.GEMM_ROLES)
    assert len(paths) == quantized and set(paths) <= set(gemm.PATHS)


def test_env_gemm_command_line():
    out = subprocess.run([sys.executable, "-m", "lowbit.env", "--gemm", "--capability", "10.0", "--out-dtype", "fp32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sm_100" in out.stdout and "GEMM output fp32" in out.stdout and "nvfp4" in out.stdout
    assert "F.scaled_mm BlockWise1x16 x BlockWise1x16" in out.stdout
