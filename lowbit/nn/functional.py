"""The quantized Linear as an autograd Function: fprop, dgrad and wgrad each in its recipe's precision.

x is [T, in] (tokens flattened), W is [out, in] (fp32 master weights, or whatever the module holds).
Every quantized GEMM is `lowbit.qmatmul` (fp32 accumulation, output in the dtype the next step
wants: the autocast / input dtype, fp32 where a bias or correction is added). Quantized weights come in from the
caller (so a module can cache them for the whole optimizer step); activations are quantized here.
What backward needs is saved already quantized (x along tokens for wgrad), which is also what
keeps the activation memory of a quantized recipe small. Where a tensor is quantized along both of
its dims (x for fprop and wgrad, dy for dgrad and wgrad, W for fprop and dgrad), one
`quantize_dual` call writes both layouts: the same bits as two `quantize` calls, with the reads
of the tensor and its transposed copy fused away where the backend has the kernel (Triton).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import QuantizeSpec, dequantize, qmatmul, quantize, quantize_dual
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


def operand_spec(op: Operand, seed: int = 0, pad: int = 1) -> QuantizeSpec:
    """`op` as one layout of `quantize_dual`, its tokens (rows) zero-padded to a multiple of `pad`."""
    return QuantizeSpec(op.fmt, op.block, op.rounding, seed, op.scale_mode, op.hadamard, pad)


def quantize_weight(weight: torch.Tensor, recipe: Recipe) -> QuantizedWeight:
    """Both quantizations of W a recipe needs; one is the transpose of the other when that is exact."""
    fw, dw = recipe.fprop_weight, recipe.dgrad_weight
    # the same codes transposed; FP4 is requantized instead, as repacking nibbles costs more
    exact_t = dw is not None and dw == fw and fw.square and fw.hadamard is None and not fw.format.packed
    with torch.no_grad():
        if fw is not None and dw is not None and not exact_t:  # both layouts in one op
            return QuantizedWeight(*quantize_dual(weight, operand_spec(fw), operand_spec(dw)))
        qf = quantize_operand(weight, fw) if fw is not None else None
        if dw is None:
            qd = None
        elif exact_t:
            qd = qf.t()
        else:
            qd = quantize_operand(weight.t(), dw)
    return QuantizedWeight(qf, qd)


def _reuse_transposed(a: Operand | None, b: Operand | None) -> bool:
    """A tensor quantized as `a` can serve, transposed, as operand `b` along the other axis."""
    return a is not None and a == b and a.tensorwise and a.hadamard is None


def _wgrad_seed(recipe: Recipe) -> int:
    """The seed shared by both wgrad operands (Hadamard signs must match; SR draws from it)."""
    return draw_seed() if (recipe.wgrad_input.hadamard or recipe.wgrad_grad.rounding == "stochastic") else 0


def _wgrad_pad(recipe: Recipe) -> int:
    """What the token dim is padded to for wgrad, which reduces over it (both operands agree)."""
    return max(recipe.wgrad_input.reduction_multiple(), recipe.wgrad_grad.reduction_multiple())


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
        fi, wi = recipe.fprop_input, recipe.wgrad_input
        clamp = recipe.activation_clamp_quantile
        saved_x = qx = xt_q = None
        wseed = 0
        fseed = draw_seed() if fi is not None and fi.rounding == "stochastic" else 0  # fresh noise every step
        if fi is not None and wi is not None and clamp is None and not _reuse_transposed(fi, wi):
            # x along in_features (fprop) and along tokens (wgrad) in one op; the wgrad seed is drawn
            # before the fprop GEMM instead of after it, the same seed as nothing between draws one
            wseed = _wgrad_seed(recipe)
            qx, xt_q = quantize_dual(x, operand_spec(fi, fseed, fi.rows_multiple()),
                                     operand_spec(wi, wseed, _wgrad_pad(recipe)))
        if fi is None:
            y = x.float() @ weight.float().t()
        else:
            xin, residual = x, None
            if clamp is not None:
                xin, residual = clamp_outliers(x, clamp)
            if qx is None:
                qx = quantize_operand(pad_rows(xin, fi.rows_multiple()), fi, fseed)
            # fp32 accumulation always; the GEMM writes the output dtype itself unless fp32 terms follow
            fp32_terms = bias is not None or (residual is not None and recipe.clamp_compensation)
            y = qmatmul(qx, wq.fprop, out_dtype=torch.float32 if fp32_terms else out_dtype)[:T]
            if residual is not None and recipe.clamp_compensation:
                # The clipped outliers (about 2 % of entries) multiply the same quantized weight in fp32.
                y = y + torch.sparse.mm(residual.float().to_sparse(), dequantize(wq.fprop).t())
        if bias is not None:
            y = y + bias.float()

        xq = None  # x^ as fprop quantized it, for a high-precision wgrad that reads it (backward_operands)
        if wi is None and recipe.backward_operands == "dequantized":
            xq = qx
        elif wi is None:
            saved_x = x
        elif xt_q is None and fi is not None and _reuse_transposed(fi, wi) and clamp is None:
            xt_q = qx.t()
        elif xt_q is None:
            wseed = _wgrad_seed(recipe)
            xt_q = quantize_operand(pad_cols(x.t(), _wgrad_pad(recipe)), wi, wseed)
        xt_tensors, ctx.xt_meta = _pack(xt_q)
        wf_tensors, ctx.wf_meta = _pack(wq.fprop)
        wd_tensors, ctx.wd_meta = _pack(wq.dgrad)
        xq_tensors, ctx.xq_meta = _pack(xq)
        ctx.n = (len(xt_tensors), len(wf_tensors), len(wd_tensors))
        ctx.save_for_backward(weight, saved_x, *xt_tensors, *wf_tensors, *wd_tensors, *xq_tensors)
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
        wd_q = _unpack(rest[nx + nf:nx + nf + nd], ctx.wd_meta)
        xq = _unpack(rest[nx + nf + nd:], ctx.xq_meta)
        hp_dequantized = recipe.backward_operands == "dequantized"  # high-precision GEMMs read W^, x^
        T = ctx.T
        dy = dy.reshape(T, -1)

        dx = dw = db = None
        dg, wg = recipe.dgrad_grad, recipe.wgrad_grad
        qdy = qdyt = None
        if ctx.needs_input_grad[0]:
            if dg is None:
                dx = dy.float() @ (dequantize(wf_q) if hp_dequantized else weight.float())
            else:
                seed = draw_seed() if dg.rounding == "stochastic" else 0
                if ctx.needs_input_grad[1] and wg is not None and not _reuse_transposed(dg, wg):
                    # dy along out_features (dgrad) and along tokens (wgrad) in one op
                    qdy, qdyt = quantize_dual(dy, operand_spec(dg, seed, dg.rows_multiple()),
                                              operand_spec(wg, ctx.wseed, _wgrad_pad(recipe)))
                else:
                    qdy = quantize_operand(pad_rows(dy, dg.rows_multiple()), dg, seed)
                dx = qmatmul(qdy, wd_q, out_dtype=ctx.x_dtype)[:T]
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if wg is None:
                dw = dy.float().t() @ (dequantize(xq)[:T] if xq is not None else saved_x.float())
            else:
                if qdyt is None and qdy is not None and _reuse_transposed(dg, wg):
                    qdyt = qdy.t()
                elif qdyt is None:
                    qdyt = quantize_operand(pad_cols(dy.t(), _wgrad_pad(recipe)), wg, ctx.wseed)
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
