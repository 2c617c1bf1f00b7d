"""The scaled_mm call for a `lowbit.backends.gemm.Plan`: operands, scales in the layout each API wants.

`build` only rearranges tensors (testable on CPU); `run` makes the call. Conventions (PyTorch's
ScaledBlas.cpp): mat_a is [M, K] row-major, mat_b is [K, N] column-major - b.data [N, K] row-major,
transposed - and FP4 codes are viewed as float4_e2m1fn_x2 (two codes a byte, element 2i in the low
nibble, as lowbit packs them). Accumulation is fp32 (use_fast_accum=False). Scales are decode
scales (x = code * scale), which is what lowbit stores, except NVFP4's global scale: lowbit keeps
the encode scale s = 448 * 6 / amax, so the GEMM gets 1 / s.

Scale arguments per ScalingType (a's; b's take the same transform over its own [N, K] rows):
  TensorWise        fp32, one element.
  RowWise           fp32 [M, 1]; b's as [1, N] (the CUTLASS kernel checks that shape).
  BlockWise1x128    fp32 [M, K/128], outer-dim-major (`scale_layout.outer_major`).
  BlockWise128x128  fp32 [L4, M/128], strides (1, L4) (`scale_layout.tiles_128x128`).
  BlockWise1x32     E8M0 bytes as float8_e8m0fnu, flat SWIZZLE_32_4_4 (`scale_layout.swizzle`).
  BlockWise1x16     E4M3, flat SWIZZLE_32_4_4; with F.scaled_mm a second, TensorWise fp32 scale
                    (1 / s) follows, and cuBLASLt multiplies the two into alpha.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import scale_layout


@dataclass
class Call:
    """One scaled_mm call: `fn` ("F.scaled_mm" or "torch._scaled_mm") with these arguments."""

    fn: str
    mat_a: torch.Tensor
    mat_b: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    post_scale: torch.Tensor | None = None  # fp32 factor for the fp32 result (NVFP4 through torch._scaled_mm)
    swap: bool = False  # the call computes (a b^T)^T
    out_dtype: torch.dtype = torch.float32


def _mat(p) -> torch.Tensor:
    data = p.data.contiguous()
    return data.view(torch.float4_e2m1fn_x2) if p.fmt.packed else data


def _fp8_scale_rows(p) -> torch.Tensor:
    """An FP8 operand's scales as [R, n] rows of fp32 (n = 1 for tensor / row, K / 128 for blocks)."""
    R = p.data.shape[0]
    s = p.scale.to(torch.float32)
    br = p.block[0]
    if s.numel() == 1:
        return s.reshape(1, 1).expand(R, 1)
    return scale_layout.expand_rows(s, br) if br != R else s.expand(R, s.shape[1])


def _scale(p, scaling: str, side: str) -> torch.Tensor:
    R = p.data.shape[0]
    if scaling == "TensorWise":
        return p.scale.to(torch.float32).reshape(())
    if scaling == "RowWise":
        s = _fp8_scale_rows(p).reshape(R, 1)
        return (s.reshape(1, R) if side == "b" else s).contiguous()
    if scaling == "BlockWise1x128":
        rows = _fp8_scale_rows(p)
        nk = p.K // 128
        if rows.shape[1] != nk:  # a tensor / row scale: the same value in every 1x128 block of the row
            rows = rows[:, :1].expand(R, nk)
        return scale_layout.outer_major(rows)
    if scaling == "BlockWise128x128":
        return scale_layout.tiles_128x128(p.scale.to(torch.float32))
    if scaling == "BlockWise1x32":
        return scale_layout.swizzle(p.scale.view(torch.uint8)).view(torch.float8_e8m0fnu)
    if scaling == "BlockWise1x16":
        return scale_layout.swizzle(scale_layout.expand_rows(p.scale, p.block[0]))
    raise ValueError(f"scaling: unknown ScalingType {scaling!r}")


def build(plan, a, b, out_dtype: torch.dtype) -> Call:
    """The Call for `plan` (path "scaled_mm") on QParts a [M, K] and b [N, K]."""
    if plan.swap:
        a, b = b, a
    scale_a, scale_b = _scale(a, plan.scaling[0], "a"), _scale(b, plan.scaling[1], "b")
    mat_a, mat_b = _mat(a), _mat(b).t()
    nvfp4 = a.fmt.kind == "nvfp4"
    if plan.api == "F.scaled_mm":
        import torch.nn.functional as F

        recipe = [getattr(F.ScalingType, s) for s in plan.scaling]
        kwargs = dict(scale_a=scale_a, scale_recipe_a=recipe[0], scale_b=scale_b, scale_recipe_b=recipe[1],
                      output_dtype=out_dtype, use_fast_accum=False)
        if plan.scaling[0] in ("BlockWise1x32", "BlockWise1x16"):
            kwargs.update(swizzle_a=F.SwizzleType.SWIZZLE_32_4_4, swizzle_b=F.SwizzleType.SWIZZLE_32_4_4)
        if nvfp4:  # two-level scaling: [block scales, 1 / global encode scale] per operand
            tw, none = F.ScalingType.TensorWise, F.SwizzleType.NO_SWIZZLE
            kwargs.update(scale_a=[scale_a, a.global_scale.float().reciprocal().reshape(())],
                          scale_b=[scale_b, b.global_scale.float().reciprocal().reshape(())],
                          scale_recipe_a=[recipe[0], tw], scale_recipe_b=[recipe[1], tw],
                          swizzle_a=[kwargs["swizzle_a"], none], swizzle_b=[kwargs["swizzle_b"], none])
        return Call("F.scaled_mm", mat_a, mat_b, kwargs, swap=plan.swap, out_dtype=out_dtype)
    post = None
    gemm_out = out_dtype
    if nvfp4:  # torch._scaled_mm has no slot for the global scales: apply them to an fp32 result
        post = (a.global_scale.float() * b.global_scale.float()).reciprocal()
        gemm_out = torch.float32
    kwargs = dict(scale_a=scale_a, scale_b=scale_b, out_dtype=gemm_out, use_fast_accum=False)
    return Call("torch._scaled_mm", mat_a, mat_b, kwargs, post, plan.swap, out_dtype)


def run(call: Call) -> torch.Tensor:
    if call.fn == "F.scaled_mm":
        import torch.nn.functional as F

        out = F.scaled_mm(call.mat_a, call.mat_b, **call.kwargs)
    else:
        out = torch._scaled_mm(call.mat_a, call.mat_b, **call.kwargs)
    if call.post_scale is not None:
        out = (out * call.post_scale).to(call.out_dtype)
    return out.t().contiguous() if call.swap else out


def scaled_mm(plan, a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b^T on the tensor cores, as `plan` says."""
    return run(build(plan, a, b, out_dtype))


# How PyTorch says that this GPU, its cuBLASLt or the torch build has no kernel for a call: (exception
# class, message), from aten/src/ATen/native/cuda/ScaledBlas.cpp, RowwiseScaledMM.cu and
# ATen/cuda/CUDABlas.cpp (2.10 - 2.14). TORCH_CHECK raises RuntimeError, TORCH_CHECK_NOT_IMPLEMENTED
# NotImplementedError (a RuntimeError), TORCH_CHECK_VALUE ValueError. Anything else (an OOM, a shape or
# layout error, which would be a bug in `build`, a CUDA fault) is no refusal.
UNSUPPORTED = (
    (RuntimeError, "torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9"),
    (RuntimeError, "Rowwise scaling is not currently supported on your device"),
    (RuntimeError, "DeepSeek style (1x128, 128x128) scaling only supported in CUDA for SM90"),
    (RuntimeError, "DeepSeek style (1x128, 128x128) scaling requires cublasLt >= 12.9"),
    (RuntimeError, "MXFP4 scaling only supported in CUDA for B200/B300"),
    (RuntimeError, "MXFP4 scaling supported on ROCM and CUDA+FBGEMM_GENAI only"),
    (RuntimeError, "scaled_gemm with `torch.float8_e8m0fnu` scales of 1x32 blocks is only supported for CUDA 12.8"),
    (RuntimeError, "scaled_gemm with `torch.float8_e4m3fn` scales of 1x16 blocks is only supported for CUDA 12.8"),
    # cuBLASLt found no algorithm (heuristic query empty, or cublasLtMatmul refused the layout)
    (RuntimeError, "CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling"),
    (ValueError, "Multiplication of two Float8_e5m2 matrices is not supported"),
)


def unsupported(exc: BaseException) -> str | None:
    """PyTorch's message when `exc` is its documented refusal of a scaled_mm call, else None."""
    if isinstance(exc, torch.OutOfMemoryError):  # a RuntimeError too: never a refusal, whatever it says
        return None
    text = str(exc)
    for cls, message in UNSUPPORTED:
        if isinstance(exc, cls) and message in text:
            return text.strip().splitlines()[0]
    return None


__all__ = ["Call", "build", "run", "scaled_mm", "UNSUPPORTED", "unsupported"]
