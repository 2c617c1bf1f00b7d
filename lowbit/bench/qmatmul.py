"""Suite `qmatmul`: lowbit.qmatmul (a @ b.T on quantized operands, fp32 accumulation) on real Linear shapes.

Shapes: the Linear layers of each selected model at ctx.tokens tokens, as (M, N, K) = (tokens,
out_features, in_features) (default llama-125m on CPU, llama-1b and llama-8b on a GPU). Operands
are quantized once, outside the timing; the time is the GEMM on the quantized operands.
work = 2 M N K flops; the limit is fp32 `torch.mm` on CPU, the datasheet peak of the operand
type on a known GPU (fp8 for FP8 / MXFP8, fp4 for MXFP4 / NVFP4).
Peers:
  torch_mm         torch.mm of the unquantized operands in fp32 (CPU) or bf16 (GPU), same shape
  torch_scaled_mm  torch._scaled_mm on float8 operands with tensor-wise scales (fp8_* formats only)
  torchao          torch.mm on torchao MXTensor / NVFP4Tensor operands (mxfp8, mxfp4, nvfp4; default blocks)
"""
from __future__ import annotations

import torch

import lowbit

from .harness import NOT_APPLICABLE
from .suite import Context, Row

DESCRIPTION = "lowbit.qmatmul on Llama Linear shapes (vs torch.mm, torch._scaled_mm, torchao MX/NVFP4)"
PARAMS = ("format", "block", "layer")
PEERS = {"torch_mm": None, "torch_scaled_mm": None, "torchao": "torchao"}

FORMATS = [("fp8_e4m3", None), ("fp8_e5m2", None), ("mxfp8", None), ("mxfp4", None), ("nvfp4", None),
           ("nvfp4", (16, 16))]
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
GPU_LIMIT = {"fp8_e4m3": "peak_fp8_TFLOP/s", "fp8_e5m2": "peak_fp8_TFLOP/s", "mxfp8": "peak_fp8_TFLOP/s",
             "mxfp4": "peak_fp4_TFLOP/s", "nvfp4": "peak_fp4_TFLOP/s"}


def scaled_mm_peer(fmt: str, a: torch.Tensor, b: torch.Tensor):
    """torch._scaled_mm on tensor-wise scaled float8 operands, or a status string."""
    if fmt not in FP8:
        return NOT_APPLICABLE
    dt = FP8[fmt]
    fmax = torch.finfo(dt).max
    sa, sb = a.abs().amax().float() / fmax, b.abs().amax().float() / fmax
    qa, qb = (a / sa).to(dt), (b / sb).to(dt)
    try:
        torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    except Exception as e:  # no kernel for this device / dtype pair
        return f"n/a: {type(e).__name__}"
    return lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)


def torchao_peer(fmt: str, block, a: torch.Tensor, b: torch.Tensor):
    """torch.mm on torchao's MXTensor / NVFP4Tensor operands, or a status string."""
    try:  # an optional peer, reported "absent" when it does not import
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception:
        return "absent"
    if block is not None:
        return NOT_APPLICABLE
    if fmt in ("mxfp8", "mxfp4"):
        el = torch.float8_e4m3fn if fmt == "mxfp8" else torch.float4_e2m1fn_x2
        qa, qb = MXTensor.to_mx(a, el, 32), MXTensor.to_mx(b, el, 32)
    elif fmt == "nvfp4":
        qa = NVFP4Tensor.to_nvfp4(a, per_tensor_scale=per_tensor_amax_to_scale(a.abs().amax()))
        qb = NVFP4Tensor.to_nvfp4(b, per_tensor_scale=per_tensor_amax_to_scale(b.abs().amax()))
    else:
        return NOT_APPLICABLE
    try:
        torch.mm(qa, qb.t())
    except Exception as e:
        return f"n/a: {type(e).__name__}"
    return lambda: torch.mm(qa, qb.t())


def run(ctx: Context) -> list[Row]:
    backend = ctx.backend_for("qmatmul")
    gpu = ctx.device == "cuda"
    default = ("llama-1b", "llama-8b") if gpu else ("llama-125m",)
    rows = []
    for model in ctx.models(default=default, quick=("llama-125m",)):
        for lin in model.linears(ctx.tokens):
            g = torch.Generator().manual_seed(1)
            a = torch.randn(lin.M, lin.K, generator=g).to(ctx.device)
            b = torch.randn(lin.N, lin.K, generator=g).to(ctx.device)
            ref_dtype = torch.bfloat16 if gpu else torch.float32
            ar, br = a.to(ref_dtype), b.to(ref_dtype)
            mm = ctx.time(lambda: torch.mm(ar, br.t()), "torch.mm")
            for fmt, block in FORMATS:
                qa = lowbit.quantize(a, fmt, backend=ctx.backend)
                qb = lowbit.quantize(b, fmt, block=block, backend=ctx.backend)
                t = ctx.time(lambda: lowbit.qmatmul(qa, qb, backend=ctx.backend), "qmatmul")
                peers = {"torch_mm": mm}
                for key, peer in (("torch_scaled_mm", scaled_mm_peer(fmt, a, b)),
                                  ("torchao", torchao_peer(fmt, block, a, b))):
                    peers[key] = peer if isinstance(peer, str) else ctx.time(peer, key)
                blabel = "1x16 x 16x16" if block else "default"
                limit = "fp32_mm_TFLOP/s"
                if gpu and GPU_LIMIT[fmt] in ctx.limits.values:
                    limit = GPU_LIMIT[fmt]
                rows.append(Row(f"{fmt} {blabel} {lin.name}", t, shape=f"{lin.M}x{lin.N}x{lin.K}",
                                dtype="float32 out", work=lin.flops, unit="TFLOP/s", limit=limit, peers=peers,
                                params=dict(format=fmt, block=blabel, layer=f"{model.name} {lin.name}"),
                                backend=backend))
            ctx.console(f"qmatmul {lin.label}: {len(FORMATS)} formats")
    return rows
