"""The Triton GEMM (`lowbit.backends.triton._gemm`) against ref.qmatmul on the same QParts.

The kernel sums the K products in another order than torch.mm, and applies the fp32 scales to
partial sums instead of to each element, so the two agree within an fp32 rounding bound, not bit
for bit. The bound (derived in `_gemm`'s docstring): with S = sum_k |x_k| |y_k| over ref's
dequantized operands and gamma(n, u) = n u / (1 - n u),

    |C - C_ref| <= (gamma(K + 2, u_kernel) + gamma(K + 2, u)) * S / ((1 - u)^2 (1 - gamma(K, 2^-53)))

u = 2^-24 (round to nearest; ref and the interpreter), u_kernel = u in the interpreter and 2u on
a GPU, whose MMA may truncate its fp32 sums. (1 - u)^2 turns S into a bound on the exact
operands' sum, and the last factor covers evaluating S in fp64. That is c * K * eps_fp32 * S
with c = 1 + O(1/K) (1.5 on a GPU): nothing in it is tuned to the data. A bf16 / fp16 output
adds one round-to-nearest of the kernel's fp32 result: u_out * |C| plus half the smallest
subnormal.

Without a GPU the kernel runs in Triton's interpreter (set before triton is imported, as in
test_backend_triton.py); operands are quantized by ref, on CPU, and ref's GEMM runs on CPU.
"""
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
    pytest.skip("triton was imported in this process before TRITON_INTERPRET=1 was set; run this file on its "
                "own or export TRITON_INTERPRET=1", allow_module_level=True)

import lowbit  # noqa: E402
from lowbit._ops import QParts  # noqa: E402
from lowbit.backends import ref  # noqa: E402
from lowbit.backends import triton as tb  # noqa: E402

DEV = "cpu" if INTERPRETED else "cuda"
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

U = 2.0**-24
U_KERNEL = U if INTERPRETED else 2 * U


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def operand(fmt, block, R, K, seed, nan_at=None, spread=8):
    """QParts of a [R, K] operand whose magnitudes vary by 2^±spread across 1 x 16 slices (so scales matter)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-spread, spread + 1, (R, -(-K // 16)), generator=g).float().repeat_interleave(16, 1)[:, :K]
    x = torch.randn(R, K, generator=g) * torch.exp2(e)
    if nan_at is not None:
        x[nan_at] = float("nan")
    return lowbit.quantize(x, fmt, block=block, backend="ref").parts()


def on(p: QParts, dev) -> QParts:
    return QParts(p.data.to(dev), p.scale.to(dev), p.global_scale.to(dev), p.fmt, p.block, p.K)


def check_gemm(pa: QParts, pb: QParts, out_dtype=torch.float32):
    """Run the kernel and assert the derived bound against ref (fp32); NaN exactly where ref has NaN."""
    got = tb.qmatmul(on(pa, DEV), on(pb, DEV), out_dtype)
    pa, pb = on(pa, "cpu"), on(pb, "cpu")  # ref's torch.mm on CPU: plain fp32, never TF32
    assert got.dtype == out_dtype and got.shape == (pa.data.shape[0], pb.data.shape[0])
    got = got.cpu().double()
    want = ref.qmatmul(pa, pb, torch.float32).double()
    x = ref.dequantize(*pa, torch.float64)
    y = ref.dequantize(*pb, torch.float64)
    K = pa.K
    s = x.abs() @ y.abs().t()
    tol = (_gamma(K + 2, U_KERNEL) + _gamma(K + 2, U)) * s / ((1 - U) ** 2 * (1 - _gamma(K, 2.0**-53)))
    if out_dtype != torch.float32:
        fi = torch.finfo(out_dtype)
        tol = tol + fi.eps / 2 * (want.abs() + tol) + fi.smallest_normal * fi.eps / 2
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ from ref"
    diff = (got - want).abs()
    ok = (diff <= tol) | nan
    assert bool(ok.all()), f"{int((~ok).sum())} outside the bound; worst excess {float((diff - tol)[~ok].max())}"
    return got, want


def rows_for(block, R):
    """Rows a block height allows: (128, 128) tiles need 128 rows, 16 x 16 a multiple of 16."""
    if block == (128, 128):
        return 128
    return -(-R // 16) * 16 if block == (16, 16) else R


SINGLE = [("fp8_e4m3", None), ("fp8_e5m2", None), ("fp8_e4m3", "row"), ("fp8_e5m2", "row"),
          ("fp8_e4m3", (1, 128)), ("fp8_e4m3", (128, 128)), ("mxfp8", None), ("mxfp8_e5m2", None),
          ("mxfp4", None), ("nvfp4", (1, 16)), ("nvfp4", (16, 16))]
MIXED = [("fp8_e5m2", "row", "fp8_e4m3", "row"),  # wgrad: dy^T x x^T
         ("fp8_e4m3", None, "fp8_e5m2", (1, 128)),
         ("fp8_e4m3", (1, 128), "fp8_e4m3", (128, 128)),
         ("fp8_e5m2", (1, 128), "fp8_e4m3", "row"),
         ("fp8_e4m3", "row", "mxfp8", None),
         ("mxfp8", None, "mxfp4", None),
         ("mxfp8_e5m2", None, "mxfp8", None),
         ("mxfp4", None, "nvfp4", (1, 16)),
         ("nvfp4", (1, 16), "nvfp4", (16, 16)),
         ("nvfp4", (16, 16), "fp8_e4m3", (128, 128))]
PAIRS = [(f, b, f, b) for f, b in SINGLE] + MIXED


@pytest.mark.parametrize("K", [128, 256])
@pytest.mark.parametrize("fa,ba,fb,bb", PAIRS, ids=lambda v: str(v).replace(" ", ""))
def test_matches_ref_within_the_fp32_order_bound(fa, ba, fb, bb, K):
    pa = operand(fa, ba, rows_for(ba, 40), K, seed=K + 1)
    pb = operand(fb, bb, rows_for(bb, 16), K, seed=K + 2)
    check_gemm(pa, pb)


@pytest.mark.parametrize("fa,ba,fb,bb,K", [("fp8_e4m3", "row", "fp8_e5m2", None, 100),  # K-tail masked
                                           ("mxfp8", None, "nvfp4", (1, 16), 96),
                                           ("fp8_e5m2", (1, 48), "mxfp4", None, 96)])  # 16-wide K-tiles
def test_shapes_not_multiples_of_the_tiles(fa, ba, fb, bb, K):
    # M, N over one 128 tile and not multiples of it: masked rows and columns, several programs
    check_gemm(operand(fa, ba, 200, K, seed=3), operand(fb, bb, 136, K, seed=4))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("fa,ba,fb,bb", [("fp8_e4m3", (1, 128), "fp8_e4m3", "row"), ("mxfp4", None, "mxfp4", None),
                                         ("nvfp4", (16, 16), "nvfp4", (1, 16))], ids=str)
def test_output_dtypes(fa, ba, fb, bb, out_dtype):
    # spread 2 keeps |C| far below fp16's overflow, where the bound is about rounding, not range
    check_gemm(operand(fa, ba, 48, 128, seed=5, spread=2), operand(fb, bb, 16, 128, seed=6, spread=2), out_dtype)


@pytest.mark.parametrize("fa,ba,fb,bb,local", [("fp8_e4m3", "row", "fp8_e5m2", (1, 128), True),
                                               ("mxfp8", None, "mxfp4", None, True),
                                               ("fp8_e4m3", (1, 128), "mxfp8_e5m2", None, True),
                                               ("fp8_e4m3", None, "fp8_e5m2", "row", False),  # one scale per tensor
                                               ("nvfp4", (16, 16), "mxfp4", None, False)],  # NaN global scale
                         ids=str)
def test_nan_scales_propagate_like_ref(fa, ba, fb, bb, local):
    # a NaN input makes its block's scale NaN (FP4 codes become 0: only the scale carries it);
    # check_gemm asserts NaN at exactly ref's positions
    got, want = check_gemm(operand(fa, ba, 48, 256, seed=7, nan_at=(3, 130)),
                           operand(fb, bb, 32, 256, seed=8, nan_at=(17, 5)))
    assert bool(torch.isnan(want[3]).all()) and bool(torch.isnan(want[:, 17]).all())
    assert bool(torch.isnan(got).all()) != local


def test_reached_through_the_public_op_without_a_dequantized_copy(monkeypatch):
    import importlib

    from lowbit.backends.triton import _dequantize

    quantize = importlib.import_module("lowbit.backends.triton.quantize")

    def no_copy(*args, **kwargs):
        raise AssertionError("qmatmul dequantized an operand in global memory")

    monkeypatch.setattr(_dequantize, "dequantize", no_copy)
    monkeypatch.setattr(quantize, "dequantize", no_copy)
    g = torch.Generator().manual_seed(9)
    qa = lowbit.quantize(torch.randn(24, 64, generator=g).to(DEV), "mxfp8", backend="ref")
    qb = lowbit.quantize(torch.randn(40, 64, generator=g).to(DEV), "nvfp4", backend="ref")
    got = lowbit.qmatmul(qa, qb, out_dtype=torch.bfloat16, backend="triton")
    assert got.dtype == torch.bfloat16 and got.shape == (24, 40) and got.device.type == DEV
    assert torch.equal(got, tb.qmatmul(qa.parts(), qb.parts(), torch.bfloat16))  # checked against ref above


def test_unsupported_combinations_raise_cleanly():
    pa = operand("fp8_e4m3", (1, 8), 16, 64, seed=10)  # K-varying fp32 scales narrower than a 16-wide dot
    pb = operand("fp8_e4m3", "row", 16, 64, seed=11)
    with pytest.raises(ValueError, match="multiple of 16"):
        tb.qmatmul(on(pa, DEV), on(pb, DEV), torch.float32)
    with pytest.raises(ValueError, match="reduction dims"):
        tb.qmatmul(on(pb, DEV), on(operand("fp8_e4m3", "row", 16, 128, seed=12), DEV), torch.float32)
    bad = pb._replace(scale=pb.scale.to(torch.float16))
    with pytest.raises(ValueError, match="scale"):
        tb.qmatmul(on(bad, DEV), on(pb, DEV), torch.float32)


_COMPILE_SCRIPT = r"""
import re, sys
import triton
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.backends.triton import _gemm

LAYOUT = {"e4m3": (4, 3, 7), "e2m1": (2, 1, 1)}
bad = []
for a, b in (((0, "e4m3", True), (0, "e4m3", True)), ((1, "e4m3", False), (1, "e2m1", False)),
             ((2, "e2m1", False), (0, "e4m3", False))):
    sig = dict(a_ptr="*u8", as_ptr="*fp32" if a[0] == 0 else "*u8", ag_ptr="*fp32", b_ptr="*u8",
               bs_ptr="*fp32" if b[0] == 0 else "*u8", bg_ptr="*fp32", c_ptr="*i16",
               **{n: "i32" for n in ("M", "N", "K", "a_br", "a_bk", "a_nbk", "b_br", "b_bk", "b_nbk")})
    consts = {}
    for p, (kind, elem, kscaled) in (("A", a), ("B", b)):
        consts.update(dict(zip((p + "_KIND", p + "_EBITS", p + "_MBITS", p + "_BIAS", p + "_PACKED", p + "_KSCALED"),
                               (kind, *LAYOUT[elem], elem == "e2m1", kscaled))))
    consts.update(zip(("O_MBITS", "O_BIAS", "O_MAX", "O_INF", "O_NAN", "O_SIGN"), _gemm.OUT_CODES[torch.bfloat16]))
    consts.update(O_CODED=True, DOT_TYPE=tl.bfloat16, BM=128, BN=128, BK=64, GROUP_M=8)
    sig.update({k: "constexpr" for k in consts})
    ptx = triton.compile(ASTSource(fn=_gemm._qmatmul_kernel, signature=sig, constexprs=consts),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3}).asm["ptx"]
    for pattern in (r"\.ftz\b", r"\bdiv\.(full|approx)", r"\b(ld|st)\.local\b"):
        if re.search(pattern, ptx):
            bad.append(f"{a} x {b}: {pattern}")
    if "wgmma" not in ptx:
        bad.append(f"{a} x {b}: no wgmma")
print("compiled")
sys.exit("; ".join(bad) if bad else 0)
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90_tensor_cores():
    """The launch configuration compiles to sm_90 wgmma with IEEE division, no flush-to-zero and no spills."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-1000:]
    assert "compiled" in res.stdout
