"""Suite `quantize`: lowbit.quantize for every format x rounding x Hadamard, and the FP8 / NVFP4 block layouts.

Input: the activation of each selected model, tokens x hidden (default llama-8b at 4096 tokens:
4096 x 4096), in bf16 and fp32. work = bytes read + written (input, codes, scales); the limit is
`Tensor.copy_` bandwidth.
Peers (same work, nearest rounding, no Hadamard, default blocks):
  torchao  MXTensor.to_mx (MXFP8 E4M3 / E5M2, MXFP4) and NVFP4Tensor.to_nvfp4 with the per-tensor scale
  torch    FP8 formats only: torch's float8 cast with lowbit's scaling (amax per block, divide, cast)
"""
from __future__ import annotations

from pathlib import Path

import torch

import lowbit

from . import harness
from .harness import NOT_APPLICABLE
from .suite import Context, Row

DESCRIPTION = "lowbit.quantize: every format x rounding x Hadamard, FP8/NVFP4 block layouts (vs torchao, torch cast)"
PARAMS = ("format", "block", "rounding", "hadamard")
PEERS = {"torchao": "torchao", "torch": None}

FORMATS = ["fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp8_e5m2", "mxfp4", "nvfp4"]
BLOCK_VARIANTS = [("fp8_e4m3", "row"), ("fp8_e4m3", (1, 128)), ("fp8_e4m3", (128, 128)), ("nvfp4", (16, 16))]
FP8_DTYPE = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def torchao_peer(fmt: str, block, rounding: str, hadamard):
    """A factory x -> closure timing torchao's version of this quantize, or a status string."""
    try:  # an optional peer, reported "absent" when it does not import
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception:
        return harness.ABSENT
    if rounding != "nearest" or hadamard or block is not None:
        return NOT_APPLICABLE
    elems = {"mxfp8": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp4": torch.float4_e2m1fn_x2}
    if fmt in elems:
        return lambda x: (lambda: MXTensor.to_mx(x, elems[fmt], 32))
    if fmt == "nvfp4":
        return lambda x: (lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())))
    return NOT_APPLICABLE


def torch_fp8_peer(fmt: str, block, rounding: str, hadamard):
    """torch's own float8 cast with lowbit's scaling: amax per block, divide, saturating cast."""
    if fmt not in FP8_DTYPE or rounding != "nearest" or hadamard:
        return NOT_APPLICABLE
    dtype, mx = FP8_DTYPE[fmt]

    def make(x):
        R, K = x.shape
        if block is None:
            def f():
                xf = x.float()
                return (xf / (xf.abs().amax() / mx)).to(dtype)
        elif block == "row":
            def f():
                xf = x.float()
                return (xf / (xf.abs().amax(-1, keepdim=True) / mx)).to(dtype)
        else:
            br, bk = block

            def f():
                t = x.float().reshape(R // br, br, K // bk, bk)
                return (t / (t.abs().amax((1, 3), keepdim=True) / mx)).to(dtype).reshape(R, K)
        return f
    return make


def qbytes(q) -> int:
    """Bytes of a QTensor's codes and scales."""
    n = q.data.numel() * q.data.element_size() + q.scale.numel() * q.scale.element_size()
    return n + (4 if q.global_scale is not None else 0)


def block_label(block) -> str:
    if block is None:
        return "default"
    return block if isinstance(block, str) else "x".join(map(str, block))


def configs() -> list[tuple]:
    """(format, block, rounding, hadamard) of every timed case."""
    out = [(f, None, r, h) for f in FORMATS for r in ("nearest", "stochastic") for h in (None, 16)]
    return out + [(f, b, "nearest", None) for f, b in BLOCK_VARIANTS]


def case_label(fmt, block, rounding, had) -> str:
    return f"{fmt} {block_label(block)} {rounding}" + (f" rht{had}" if had else "")


def run(ctx: Context) -> list[Row]:
    backend = ctx.backend_for("quantize")
    rows = []
    for model in ctx.models(default=("llama-8b",), quick=("llama-125m",)):
        shape = (ctx.tokens, model.hidden)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(*shape, device=ctx.device).to(dtype)
            dname = str(dtype).replace("torch.", "")
            for fmt, block, rounding, had in configs():
                def fn():
                    return lowbit.quantize(x, fmt, block=block, rounding=rounding, hadamard=had, seed=1,
                                           backend=ctx.backend)
                label = case_label(fmt, block, rounding, had)
                params = dict(format=fmt, block=block_label(block), rounding=rounding, hadamard=had or "")
                try:
                    nbytes = x.numel() * x.element_size() + qbytes(fn())
                except ValueError as e:  # e.g. --tokens not divisible by a 128-row block
                    rows.append(Row(label, None, shape=f"{shape[0]}x{shape[1]}", dtype=dname, params=params,
                                    backend=backend, note=f"not run: {e}"))
                    continue
                t = ctx.time(fn, fmt)
                peers = {}
                for key, peer in (("torchao", torchao_peer(fmt, block, rounding, had)),
                                  ("torch", torch_fp8_peer(fmt, block, rounding, had))):
                    peers[key] = peer if isinstance(peer, str) else ctx.time(peer(x), key)
                rows.append(Row(label, t, shape=f"{shape[0]}x{shape[1]}", dtype=dname, work=nbytes, unit="GB/s",
                                limit="copy_GB/s", peers=peers, params=params, backend=backend))
            ctx.console(f"quantize {model.name} {dname}: {len(configs())} cases")
    return rows


def plot(path: Path, records: list[dict], ctx: Context) -> str:
    """Fraction of copy_ bandwidth per case, bf16 and fp32 input side by side."""
    q = [r for r in records if not r["case"].startswith("limit ")]
    labels = list(dict.fromkeys(f"{r['case']} {r['shape']}" for r in q))
    series = {}
    for dtype in ("bfloat16", "float32"):
        by = {f"{r['case']} {r['shape']}": r["ratio_to_limit"] for r in q if r["dtype"] == dtype}
        series[f"{dtype} input"] = [by.get(lab) for lab in labels]
    title = (f"lowbit.quantize on {ctx.machine} ({q[0]['backend']} backend): GB/s as a fraction of "
             f"Tensor.copy_ ({ctx.limits.values['copy_GB/s']:.1f} GB/s)")
    return harness.bar_chart(path, title, labels, series, "fraction of copy_ bandwidth", hline=0.5)
