"""The GEMM dispatch table: which path runs a quantized a [M, K] @ b [N, K]^T on a GPU, and why.

`choose` is pure (no GPU needed): operand formats and block layouts, output dtype, compute
capability and what the installed torch offers (`Features`) give a `Plan`. Paths, best first:

  scaled_mm  torch.nn.functional.scaled_mm (torch >= 2.10), else torch._scaled_mm: the tensor
             cores read the FP8 / FP4 codes and their scales (`lowbit.backends.cuda.scaled_mm`).
  triton     lowbit's Triton GEMM (`lowbit.backends.triton.qmatmul`) for formats the GPU has no
             instruction for: it reads the packed codes and scales and dequantizes tiles in registers.
  dequant    both operands dequantized to fp32, then torch.mm (warned once per format pair).

What scaled_mm can run where, from PyTorch's aten/src/ATen/native/cuda/ScaledBlas.cpp,
ScaledBlasUtils.cpp and RowwiseScaledMM.cu (2.10 - 2.13) and the cuBLAS 12.9 documentation:
  sm_89+   FP8 tensor-wise scales (cuBLASLt); no E5M2 x E5M2 kernel exists.
  sm_89+   FP8 row-wise: CUTLASS kernels for sm_89 / 90 / 100 / 120 (second operand E4M3; output
           bf16, and fp16 from torch 2.10); on sm_90 with cuBLAS >= 12.9 cuBLASLt's outer-vector
           scales run instead and also write fp32.
  sm_90    FP8 1x128 x 128x128, 128x128 x 1x128, 1x128 x 1x128 blocks (cuBLASLt >= 12.9, E4M3 only;
           PyTorch refuses them on any other architecture).
  sm_100+  MXFP8 (E4M3 elements, E8M0 1x32 scales) and NVFP4 (E4M3 1x16 scales, the two fp32
           global scales as alpha): cuBLASLt block scaling, scales swizzled (`scale_layout`).
  sm_10x   MXFP4: torch._scaled_mm sends it to cuBLASLt; F.scaled_mm would send it to MSLK's
           f4f4bf16 (only in MSLK builds, bf16 output only), so the legacy entry point is used.
  sm_120   (RTX 50 / RTX PRO Blackwell) cuBLASLt's MXFP8 / NVFP4 kernels run in the TN layout used
           here (pytorch/pytorch#198126); row-wise FP8 runs the sm_120 CUTLASS kernel (#155991;
           #192707 reports it failing on a 2.10+cu130 wheel); FP8 blocks are sm_90 only, and MXFP4
           goes to Triton: PyTorch gates its MXFP4 kernel to sm_10x, and no source confirms
           cuBLASLt's FP4 x E8M0 kernel on sm_120.
Every scaled_mm path needs M, N, K multiples of 16 (PyTorch checks K and N; M is held to it too, the
shapes the FP8 kernels are tested on) and a bf16 / fp16 / fp32 output. Exact scale
re-layouts widen what fits: a tensor-wise FP8 operand joins a row-wise or 1x128 one as rows of
equal scales, 128x128 tiles become 1x128 rows, NVFP4 16x16 weight tiles become 1x16 rows.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..formats import Format, get_format

PATHS = ("scaled_mm", "triton", "dequant")
GEMM_ROLES = {"fprop": ("x", "W"), "dgrad": ("dy", "W"), "wgrad": ("dy^T", "x^T")}
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ASSUMED_CUDA = (12, 9)  # what a CPU-only torch is assumed to stand for when it prints the table
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _version(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Features:
    """What the installed torch offers the GEMM (detected once by `detect`)."""

    torch: tuple[int, int]
    cuda: tuple[int, int] | None  # CUDA toolkit torch was built with (stands for cuBLAS); None: CPU build
    f_scaled_mm: bool  # torch.nn.functional.scaled_mm
    v1_scaled_mm: bool  # torch._scaled_mm
    scalings: frozenset[str] = frozenset()  # ScalingType members
    swizzles: frozenset[str] = frozenset()  # SwizzleType members
    triton: str | None = None  # None when lowbit's Triton backend can run qmatmul on CUDA, else why not

    @property
    def cublas(self) -> tuple[int, int]:
        return self.cuda or ASSUMED_CUDA

    def v2(self, *scalings: str, swizzled: bool = False) -> bool:
        """Whether F.scaled_mm exists with these ScalingTypes (and SWIZZLE_32_4_4)."""
        return (self.f_scaled_mm and set(scalings) <= self.scalings
                and (not swizzled or "SWIZZLE_32_4_4" in self.swizzles))


@functools.lru_cache(maxsize=None)
def detect() -> Features:
    import torch.nn.functional as F

    from . import why_unavailable

    def members(name: str) -> frozenset[str]:
        enum = getattr(F, name, None)
        return frozenset(getattr(enum, "__members__", {})) if enum is not None else frozenset()

    return Features(torch=_version(torch.__version__), cuda=_version(torch.version.cuda),
                    f_scaled_mm=hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"),
                    v1_scaled_mm=hasattr(torch, "_scaled_mm"), scalings=members("ScalingType"),
                    swizzles=members("SwizzleType"), triton=why_unavailable("triton", "qmatmul", "cuda"))


@dataclass(frozen=True)
class Plan:
    """path: one of PATHS. api / scaling / swap describe the scaled_mm call (`cuda.scaled_mm`)."""

    path: str
    reason: str
    api: str | None = None  # "F.scaled_mm" or "torch._scaled_mm"
    scaling: tuple[str, str] | None = None  # ScalingType name of each operand's scales, after re-layout
    swap: bool = False  # run (b a^T)^T: the kernel wants its second operand E4M3


def capability_of(value) -> tuple[int, int]:
    """(major, minor) from (9, 0), "9.0" or 9.0."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    major, _, minor = str(value).partition(".")
    return int(major), int(minor or 0)


def layout(fmt: Format, tile) -> str:
    """A block layout's name: FP8 tiles are (rows | None, cols | None), None meaning the whole dim."""
    r, c = tile
    if fmt.kind == "fp8":
        names = {(None, None): "tensor", (1, None): "row"}
        return names.get((r, c), f"{r or 'R'}x{c or 'K'}")
    return f"{r}x{c}"


def tile_of(p) -> tuple[int | None, int | None]:
    """The tile of a `lowbit._ops.QParts` operand: FP8's (R, K) block is the tensor, (1, K) a row."""
    br, bk = p.block
    if p.fmt.kind == "fp8" and bk == p.K and br in (p.data.shape[0], 1):
        return (None if br == p.data.shape[0] else 1), None
    return br, bk


def _fp8(fa, la, fb, lb, out_dtype, cap, f, shape, sm):
    if fa.elem.name == fb.elem.name == "e5m2":
        return "E5M2 x E5M2: cuBLASLt has no such FP8 GEMM"
    known = ("tensor", "row", "1x128", "128x128")
    if la not in known or lb not in known:
        return f"FP8 {la} x {lb} scales: scaled_mm takes tensor, row, 1x128 and 128x128 scales only"
    if la == lb == "tensor":
        api = "F.scaled_mm" if f.v2("TensorWise") else "torch._scaled_mm"
        return Plan("scaled_mm", "FP8 tensor-wise: cuBLASLt FP8 GEMM, the two scales as alpha", api,
                    ("TensorWise", "TensorWise"))
    if {la, lb} <= {"tensor", "row"}:
        if cap[0] == 9 and f.cublas >= (12, 9):
            kernel, outs = "cuBLASLt outer-vector scales (sm_90, cuBLAS >= 12.9)", OUT_DTYPES
        else:
            kernel = f"the CUTLASS row-wise kernel ({sm})"
            outs = (torch.bfloat16,) + ((torch.float16,) if f.torch >= (2, 10) else ())
        if out_dtype not in outs:
            return (f"FP8 row-wise on {sm} runs {kernel}, which writes {'/'.join(_NAMES[d] for d in outs)}, "
                    f"not {_NAMES[out_dtype]}")
        swap = fb.elem.name != "e4m3"
        notes = ["; tensor-wise scale repeated per row" if "tensor" in (la, lb) else "",
                 "; operands swapped (b a^T)^T so the E4M3 one comes second" if swap else ""]
        api = "F.scaled_mm" if f.v2("RowWise") else "torch._scaled_mm"
        return Plan("scaled_mm", f"FP8 row-wise: {kernel}{''.join(notes)}", api, ("RowWise", "RowWise"), swap)
    if cap[0] != 9:
        return f"FP8 {la} x {lb} blocks: cuBLASLt has 1x128 / 128x128 block scales on sm_90 only, not {sm}"
    if not fa.elem.name == fb.elem.name == "e4m3":
        return f"FP8 {la} x {lb} blocks with E5M2: cuBLASLt's block-scaled FP8 GEMM takes E4M3 x E4M3 only"
    if not f.v2("BlockWise1x128", "BlockWise128x128"):
        return "FP8 1x128 / 128x128 blocks need torch.nn.functional.scaled_mm (torch >= 2.10)"
    if f.cublas < (12, 9):
        return f"FP8 1x128 / 128x128 blocks need cuBLAS >= 12.9 (this torch: CUDA {f.cuda[0]}.{f.cuda[1]})"
    if shape is not None and shape[2] % 128:
        return f"K = {shape[2]}: 1x128 blocks need K a multiple of 128"
    ta = "BlockWise128x128" if la == "128x128" and lb != "128x128" else "BlockWise1x128"
    tb = "BlockWise128x128" if lb == "128x128" else "BlockWise1x128"
    notes = "".join(f"; {side}'s {src} scales as 1x128 rows" for side, src, t in (("a", la, ta), ("b", lb, tb))
                    if src != t[9:])
    return Plan("scaled_mm", f"FP8 {ta[9:]} x {tb[9:]} blocks: cuBLASLt block scaling (sm_90){notes}",
                "F.scaled_mm", (ta, tb))


def _mx(fa, la, fb, lb, out_dtype, cap, f, shape, sm):
    if la != "1x32" or lb != "1x32":
        return f"MX {la} x {lb}: scaled_mm takes 1x32 blocks"
    if cap[0] < 10:
        return f"{sm} has no block-scaled (MX) tensor-core instruction (sm_100+)"
    fp4 = (fa.elem.name == "e2m1", fb.elem.name == "e2m1")
    if fp4[0] != fp4[1]:
        return f"{fa.name} x {fb.name}: scaled_mm multiplies MX operands of one element type"
    if fp4[0]:
        if cap[0] != 10:
            return f"MXFP4: PyTorch's MXFP4 GEMM is gated to sm_10x (B200 / B300), and {sm}'s is unconfirmed"
        if not f.v1_scaled_mm:
            return "MXFP4 runs through torch._scaled_mm (cuBLASLt), which this torch lacks"
        return Plan("scaled_mm", "MXFP4 1x32 E8M0 scales, swizzled: cuBLASLt block-scaled FP4 via torch._scaled_mm "
                    "(F.scaled_mm would route MXFP4 to MSLK: bf16 out, MSLK builds only)", "torch._scaled_mm",
                    ("BlockWise1x32", "BlockWise1x32"))
    if not fa.elem.name == fb.elem.name == "e4m3":
        return "MXFP8 with E5M2 elements: scaled_mm's MX GEMM takes E4M3 elements only"
    api = "F.scaled_mm" if f.v2("BlockWise1x32", swizzled=True) else "torch._scaled_mm"
    return Plan("scaled_mm", "MXFP8 1x32 E8M0 scales, swizzled: cuBLASLt block scaling (sm_100+)", api,
                ("BlockWise1x32", "BlockWise1x32"))


def _nvfp4(fa, la, fb, lb, out_dtype, cap, f, shape, sm):
    if la not in ("1x16", "16x16") or lb not in ("1x16", "16x16"):
        return f"NVFP4 {la} x {lb}: scaled_mm takes 1x16 blocks"
    if cap[0] < 10:
        return f"{sm} has no block-scaled FP4 tensor-core instruction (sm_100+)"
    if f.v2("BlockWise1x16", "TensorWise", swizzled=True):
        api, how = "F.scaled_mm", "the fp32 global scales as alpha"
    else:
        api, how = "torch._scaled_mm", "the fp32 global scales applied to an fp32 result"
    notes = "".join(f"; {side}'s 16x16 tiles as 1x16 rows" for side, src in (("a", la), ("b", lb)) if src == "16x16")
    return Plan("scaled_mm", f"NVFP4 1x16 E4M3 scales, swizzled: cuBLASLt block scaling (sm_100+), {how}{notes}",
                api, ("BlockWise1x16", "BlockWise1x16"))


def _scaled_mm_plan(fa, la, fb, lb, out_dtype, cap, f, shape):
    """A scaled_mm Plan, or why scaled_mm cannot run this GEMM."""
    sm = f"sm_{cap[0]}{cap[1]}"
    if not (f.f_scaled_mm or f.v1_scaled_mm):
        return "this torch has neither torch.nn.functional.scaled_mm nor torch._scaled_mm"
    if cap < (8, 9):
        return f"{sm} has no FP8 / FP4 tensor cores (scaled_mm needs sm_89+)"
    if out_dtype not in OUT_DTYPES:
        return f"scaled_mm writes bf16 / fp16 / fp32, not {out_dtype}"
    if shape is not None and any(d % 16 for d in shape):
        return f"M, N, K = {tuple(shape)}: scaled_mm needs multiples of 16"
    if fa.kind != fb.kind:
        return f"{fa.name} x {fb.name}: scaled_mm multiplies operands of one scaling family"
    kind = {"fp8": _fp8, "mx": _mx, "nvfp4": _nvfp4}[fa.kind]
    return kind(fa, la, fb, lb, out_dtype, cap, f, shape, sm)


@functools.lru_cache(maxsize=4096)
def choose(a_fmt, a_tile, b_fmt, b_tile, out_dtype: torch.dtype = torch.bfloat16, capability=(9, 0),
           features: Features | None = None, shape: tuple[int, int, int] | None = None) -> Plan:
    """The Plan for a @ b^T: formats (names or Formats), tiles (see `layout`), (M, N, K) if known."""
    fa, fb = get_format(a_fmt), get_format(b_fmt)
    cap = capability_of(capability)
    f = features or detect()
    if "int4" in (fa.kind, fb.kind):
        return Plan("dequant", f"{fa.name} x {fb.name}: INT4 groups carry zero points or kept values that no GEMM "
                    "kernel reads; both operands are dequantized (the Stable-SPAM set-up's GEMMs run in high precision)")
    got = _scaled_mm_plan(fa, layout(fa, tuple(a_tile)), fb, layout(fb, tuple(b_tile)), out_dtype, cap, f, shape)
    if isinstance(got, Plan):
        return got
    return after_scaled_mm(got, cap, f)


def after_scaled_mm(reason: str, capability=(9, 0), features: Features | None = None) -> Plan:
    """The next path in the table when scaled_mm cannot run a GEMM, `reason` saying why: Triton, else dequant."""
    cap = capability_of(capability)
    f = features or detect()
    if cap < (8, 0):
        return Plan("dequant", f"{reason}; the Triton GEMM needs sm_80+")
    if f.triton is not None:
        return Plan("dequant", f"{reason}; the Triton backend is unavailable ({f.triton})")
    return Plan("triton", reason)


def plan_for(a, b, out_dtype: torch.dtype, capability, features: Features | None = None) -> Plan:
    """The Plan for two `lowbit._ops.QParts` operands of known shape."""
    shape = (a.data.shape[0], b.data.shape[0], a.K)
    return choose(a.fmt, tile_of(a), b.fmt, tile_of(b), out_dtype, capability_of(capability), features, shape)


def with_cuda(features: Features, cuda) -> Features:
    """`features` as if torch had been built with CUDA `cuda` ("12.8" or (12, 8))."""
    return dataclasses.replace(features, cuda=capability_of(cuda))


def table(recipes, capability=(9, 0), features: Features | None = None, out_dtype=torch.bfloat16):
    """[(recipe name, gemm, "a-desc", "b-desc", Plan | None)] over `recipes` (e.g. lowbit.nn's RECIPES).

    Plan is None for a GEMM the recipe keeps in high precision. Recipes are read through
    `recipe.gemm(name)` -> (a Operand, b Operand), so this layer needs no import of lowbit.nn.
    """
    rows = []
    for recipe in recipes:
        for gemm in GEMM_ROLES:
            a, b = recipe.gemm(gemm)
            if a is None:
                rows.append((recipe.name, gemm, "-", "-", None))
                continue
            fa, fb = a.format, b.format
            plan = choose(fa, a.tile(), fb, b.tile(), out_dtype, capability, features)
            rows.append((recipe.name, gemm, f"{fa.name} {layout(fa, a.tile())}", f"{fb.name} {layout(fb, b.tile())}",
                         plan))
    return rows


__all__ = ["PATHS", "GEMM_ROLES", "Features", "Plan", "detect", "choose", "after_scaled_mm", "plan_for", "table",
           "layout", "tile_of", "capability_of", "with_cuda"]
