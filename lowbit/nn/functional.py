"""The quantized Linear as an autograd Function: fprop, dgrad and wgrad each in its recipe's precision.

x is [T, in] (tokens flattened), W is [out, in] (fp32 master weights, or whatever the module holds).
Every quantized GEMM is `lowbit.qmatmul` (fp32 accumulation, output in the dtype the next step
wants: the autocast / input dtype, fp32 where a bias or correction is added). Quantized weights come in from the
caller (so a module can cache them for the whole optimizer step); activations are quantized here.
What backward needs is saved already quantized (x along tokens for wgrad), which is also what
keeps the activation memory of a quantized recipe small.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import dequantize, qmatmul, quantize
from ..qtensor import QTensor
from .dge import dge_derivative
from .outliers import clamp_outliers
from .recipe import Operand, Recipe

SEED_LIMIT = 2**62


class QuantizedWeight(NamedTuple):
    """W quantized for fprop (along in_features) and for dgrad (W^T along out_features)."""

    fprop: QTensor | None
    dgrad: QTensor | None


def draw_seed() -> int:
    """A fresh rounding / Hadamard seed from torch's default generator (checkpointed with the RNG state)."""
    return int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64))


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 to a multiple (zero rows add nothing to a GEMM)."""
    extra = -t.shape[0] % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


def pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def quantize_operand(t: torch.Tensor, op: Operand, seed: int = 0) -> QTensor:
    """Quantize a 2-D operand [other, reduction] along its last dim as `op` says."""
    return quantize(t, op.fmt, block=op.block, rounding=op.rounding, seed=seed, hadamard=op.hadamard,
                    scale_mode=op.scale_mode)


def quantize_weight(weight: torch.Tensor, recipe: Recipe) -> QuantizedWeight:
    """Both quantizations of W a recipe needs; one is the transpose of the other when that is exact."""
    fw, dw = recipe.fprop_weight, recipe.dgrad_weight
    with torch.no_grad():
        qf = quantize_operand(weight, fw) if fw is not None else None
        if dw is None:
            qd = None
        elif dw == fw and fw.square and fw.hadamard is None and not fw.format.packed:
            qd = qf.t()  # the same codes; FP4 is requantized instead, as repacking nibbles costs more
        else:
            qd = quantize_operand(weight.t(), dw)
    return QuantizedWeight(qf, qd)


def _reuse_transposed(a: Operand | None, b: Operand | None) -> bool:
    """A tensor quantized as `a` can serve, transposed, as operand `b` along the other axis."""
    return a is not None and a == b and a.tensorwise and a.hadamard is None


def _pack(q: QTensor | None) -> tuple[list[torch.Tensor], tuple | None]:
    if q is None:
        return [], None
    tensors = [q.data, q.scale] + ([q.global_scale] if q.global_scale is not None else [])
    return tensors, (q.fmt, q.shape, q.axis, q.block, len(tensors))


def _unpack(tensors: list[torch.Tensor], meta) -> QTensor | None:
    if meta is None:
        return None
    fmt, shape, axis, block, n = meta
    gs = tensors[2] if n == 3 else None
    return QTensor(tensors[0], tensors[1], gs, fmt, shape, axis, block)


class LowBitLinearFunction(torch.autograd.Function):
    """y = x W^T + b with each GEMM in the precision of `recipe` (straight-through or DGE for W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                wq: QuantizedWeight, out_dtype: torch.dtype):
        T = x.shape[0]
        fi = recipe.fprop_input
        saved_x = None
        xt_q = None
        if fi is None:
            y = x.float() @ weight.float().t()
        else:
            xin, residual = x, None
            if recipe.activation_clamp_quantile is not None:
                xin, residual = clamp_outliers(x, recipe.activation_clamp_quantile)
            qx = quantize_operand(pad_rows(xin, fi.rows_multiple()), fi)
            # fp32 accumulation always; the GEMM writes the output dtype itself unless fp32 terms follow
            fp32_terms = bias is not None or (residual is not None and recipe.clamp_compensation)
            y = qmatmul(qx, wq.fprop, out_dtype=torch.float32 if fp32_terms else out_dtype)[:T]
            if residual is not None and recipe.clamp_compensation:
                # The clipped outliers (about 2 % of entries) multiply the same quantized weight in fp32.
                y = y + torch.sparse.mm(residual.float().to_sparse(), dequantize(wq.fprop).t())
        if bias is not None:
            y = y + bias.float()

        wseed = 0
        wi = recipe.wgrad_input
        if wi is None:
            saved_x = x
        elif fi is not None and _reuse_transposed(fi, wi) and recipe.activation_clamp_quantile is None:
            xt_q = qx.t()
        else:
            wseed = draw_seed() if (wi.hadamard or recipe.wgrad_grad.rounding == "stochastic") else 0
            mult = max(wi.reduction_multiple(), recipe.wgrad_grad.reduction_multiple())
            xt_q = quantize_operand(pad_cols(x.t(), mult), wi, wseed)
        xt_tensors, ctx.xt_meta = _pack(xt_q)
        wf_tensors, ctx.wf_meta = _pack(wq.fprop)
        wd_tensors, ctx.wd_meta = _pack(wq.dgrad)
        ctx.n = (len(xt_tensors), len(wf_tensors), len(wd_tensors))
        ctx.save_for_backward(weight, saved_x, *xt_tensors, *wf_tensors, *wd_tensors)
        ctx.recipe, ctx.wseed, ctx.T = recipe, wseed, T
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        recipe: Recipe = ctx.recipe
        weight, saved_x, *rest = ctx.saved_tensors
        nx, nf, nd = ctx.n
        xt_q = _unpack(rest[:nx], ctx.xt_meta)
        wf_q = _unpack(rest[nx:nx + nf], ctx.wf_meta)
        wd_q = _unpack(rest[nx + nf:], ctx.wd_meta)
        T = ctx.T
        dy = dy.reshape(T, -1)

        dx = dw = db = None
        dg = recipe.dgrad_grad
        qdy = None
        if ctx.needs_input_grad[0]:
            if dg is None:
                dx = dy.float() @ weight.float()
            else:
                seed = draw_seed() if dg.rounding == "stochastic" else 0
                qdy = quantize_operand(pad_rows(dy, dg.rows_multiple()), dg, seed)
                dx = qmatmul(qdy, wd_q, out_dtype=ctx.x_dtype)[:T]
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            wg = recipe.wgrad_grad
            if wg is None:
                dw = dy.float().t() @ saved_x.float()
            else:
                if qdy is not None and _reuse_transposed(dg, wg):
                    qdyt = qdy.t()
                else:
                    mult = max(wg.reduction_multiple(), recipe.wgrad_input.reduction_multiple())
                    qdyt = quantize_operand(pad_cols(dy.t(), mult), wg, ctx.wseed)
                dge = recipe.weight_estimator == "dge"  # the DGE factor multiplies in fp32
                dw = qmatmul(qdyt, xt_q, out_dtype=torch.float32 if dge else weight.dtype)
            if recipe.weight_estimator == "dge":
                dw = dw * dge_derivative(weight, wf_q, recipe.dge_k, recipe.dge_clip)
            dw = dw.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def lowbit_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                  wq: QuantizedWeight | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form: x [..., in] @ W^T (+ b) in `recipe`'s precision; returns [..., out]."""
    lead = x.shape[:-1]
    if wq is None:
        wq = quantize_weight(weight, recipe)
    y = LowBitLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, recipe, wq, out_dtype or x.dtype)
    return y.reshape(*lead, weight.shape[0])
