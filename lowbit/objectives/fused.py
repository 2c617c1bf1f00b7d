"""Fused LM head + loss: the logits are computed chunk by chunk and never held in full.

For every objective in :mod:`lowbit.objectives.sft` the per-token loss is f(log p) with
log p = z_y - logsumexp(z), so its gradient w.r.t. the logits is f'(log p) * (onehot(y) - softmax(z)).
Each chunk of tokens therefore needs only its own fp32 logits:

* scalar reductions (``"mean"`` / ``"sum"``): the forward pass computes the loss and, in the same
  sweep, the gradients w.r.t. ``hidden`` (per chunk) and the weight (accumulated in fp32), as in
  Liger-Kernel's fused linear cross-entropy; backward only scales them by the incoming gradient.
  ``top_fraction`` / ``bottom_fraction`` rank all tokens first, which costs one extra logits pass; the
  probability thresholds of the paper's keys (``OnlyTopP-<q>``, ...) are decided token by token.
* per-token outputs (``reduction="none"``, :func:`fused_linear_token_logps`, and the per-sequence
  log-probs that DPO / KLDO need): the forward pass keeps only log p and logsumexp per token; backward
  recomputes each chunk's logits (one extra GEMM) because the incoming gradient is not known earlier.

Peak extra memory is one ``chunk x V`` fp32 block plus fp32 gradients of ``hidden`` and the weight.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .sft import _check_labels, _check_objective, _check_reduction, _keep_mask, _reduce, _token_dloss, _token_loss

__all__ = ["fused_linear_sft_loss", "fused_linear_token_logps", "fused_linear_sequence_logps", "TensorMemoryTracker"]

def _default_chunk(n_tokens: int, hidden: int, vocab: int) -> int:
    # Liger's rule sizes a chunk's logits like the hidden states (n * hidden / vocab rows). Each chunk
    # also reads and writes the whole vocab x hidden weight gradient, so with a small hidden size that
    # rule gives chunks too short to amortise it (measured on 2 CPU cores, hidden 128: 32 rows at vocab
    # 128k ran 2.4x slower than unfused; 256 rows 0.75x at vocab 32k and ~1x at 128k, where 256-1024
    # rows were within noise); hence at least 256 rows, but no more than 1/8 of the tokens so the
    # chunk stays a small fraction of the full logits.
    rows = max(n_tokens * hidden // vocab, min(256, n_tokens // 8))
    return max(1, min(n_tokens, rows))


def _check_inputs(hidden, weight, labels, bias, ignore_index, chunk_size):
    for name, t in (("hidden", hidden), ("lm_head_weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be 2-D (vocab, hidden), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden last dim {tuple(hidden.shape)[-1:]} does not match lm_head_weight "
                         f"shape {tuple(weight.shape)} (vocab, hidden)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match vocab size {weight.shape[0]}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return _check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index, "hidden.shape[:-1]")


def _acc_dtype(*ts) -> torch.dtype:
    # fp32 accumulation; fp64 only when every input is fp64 (reference / gradcheck use).
    return torch.float64 if all(t is None or t.dtype == torch.float64 for t in ts) else torch.float32


def _chunk_logits(h: torch.Tensor, w32: torch.Tensor, b32: Optional[torch.Tensor]) -> torch.Tensor:
    z = h.to(w32.dtype) @ w32.t()
    if b32 is not None:
        z += b32
    return z


def _logp_pass(h2, w32, b32, safe, chunk):
    """Target log-prob and logsumexp per token, chunk by chunk (no gradients)."""
    n = h2.shape[0]
    logp = torch.empty(n, dtype=w32.dtype, device=h2.device)
    lse = torch.empty_like(logp)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = _chunk_logits(h2[s:e], w32, b32)
        lse[s:e] = torch.logsumexp(z, dim=-1)
        logp[s:e] = z.gather(1, safe[s:e, None]).squeeze(1) - lse[s:e]
        del z
    return logp, lse


def _accumulate_grads(g, hc, w32, rows, grad_h, grad_w, grad_b):
    """Add one chunk's logit gradient `g` into the hidden / weight / bias gradients (None: not wanted)."""
    if grad_h is not None:
        grad_h[rows] = g @ w32
    if grad_w is not None:
        grad_w.addmm_(g.t(), hc.to(grad_w.dtype))
    if grad_b is not None:
        grad_b += g.sum(0)


def _softmax_grad_(z: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: z <- coef * (onehot(target) - softmax(z)), the gradient of coef * log p w.r.t. z."""
    z.sub_(lse[:, None]).exp_().mul_(-coef[:, None])
    z.scatter_add_(1, target[:, None], coef[:, None])
    return z


class _FusedScalar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, spec, reduction, chunk, want_grads):
        shape_h = hidden.shape
        h2 = hidden.reshape(-1, shape_h[-1])
        safe = torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1).long()
        valid_f = valid.reshape(-1)
        n = h2.shape[0]
        acc = _acc_dtype(hidden, weight, bias)
        w32 = weight.to(acc)
        b32 = bias.to(acc) if bias is not None else None
        # Under no_grad the gradients would be thrown away: skip the two extra GEMMs per chunk.
        need_h, need_w, need_b = (want_grads and ctx.needs_input_grad[i] for i in range(3))
        need_any = need_h or need_w or need_b

        keep_global = None
        if spec.ranks_tokens:
            logp_all, _ = _logp_pass(h2, w32, b32, safe, chunk)
            keep_global = _keep_mask(logp_all, valid_f, spec)
            del logp_all

        grad_h = torch.zeros(n, shape_h[-1], dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        kept = torch.zeros((), dtype=torch.int64, device=hidden.device)  # summed on device: no sync per chunk
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc = h2[s:e]
            z = _chunk_logits(hc, w32, b32)
            lse = torch.logsumexp(z, dim=-1)
            tgt = safe[s:e]
            logp = z.gather(1, tgt[:, None]).squeeze(1) - lse
            keep = keep_global[s:e] if keep_global is not None else _keep_mask(logp, valid_f[s:e], spec)
            kept += keep.sum()
            total += torch.where(keep, _token_loss(logp, spec), torch.zeros_like(logp)).sum(dtype=torch.float64)
            if need_any:
                coef = torch.where(keep, _token_dloss(logp, spec), torch.zeros_like(logp))
                g = _softmax_grad_(z, lse, coef, tgt)
                _accumulate_grads(g, hc, w32, slice(s, e), grad_h, grad_w, grad_b)
                del g
            del z

        if kept.device.type == "cpu" and kept == 0:  # on a GPU, reading `kept` would wait for the device
            warnings.warn("fused_linear_sft_loss: no token is kept (all labels are ignore_index, or the "
                          "objective's selection is empty); returning a zero loss", RuntimeWarning, stacklevel=3)
        scale = 1.0 / kept.clamp(min=1).to(torch.float64) if reduction == "mean" else None
        loss = (total if scale is None else total * scale).to(acc)
        grads = []
        for g, ref in ((grad_h, hidden), (grad_w, weight), (grad_b, bias)):
            if g is not None:
                if scale is not None:
                    g.mul_(scale)
                g = g.to(ref.dtype)
            grads.append(g)
        if grad_h is not None:
            grads[0] = grads[0].view(shape_h)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.has = [g is not None for g in grads]
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        # The common case (loss.backward()) passes exactly 1: skip a full-size multiply where knowing
        # that is free; on a GPU reading grad_out would wait for the device, so multiply there
        one = grad_out.device.type == "cpu" and bool(grad_out == 1)
        out = []
        for has in ctx.has:
            if has:
                g = next(saved)
                out.append(g if one else g * grad_out.to(g.dtype))
            else:
                out.append(None)
        return out[0], out[1], out[2], None, None, None, None, None, None


class _FusedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, chunk):
        shape_h = hidden.shape
        h2 = hidden.reshape(-1, shape_h[-1])
        safe = torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1).long()
        acc = _acc_dtype(hidden, weight, bias)
        w32 = weight.to(acc)
        b32 = bias.to(acc) if bias is not None else None
        logp, lse = _logp_pass(h2, w32, b32, safe, chunk)
        logp = torch.where(valid.reshape(-1), logp, torch.zeros_like(logp))
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), safe, valid, lse)
        ctx.has_bias = bias is not None
        ctx.chunk = chunk
        return logp.view(valid.shape)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, safe, valid, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        shape_h = hidden.shape
        h2 = hidden.reshape(-1, shape_h[-1])
        n = h2.shape[0]
        acc = _acc_dtype(hidden, weight, bias)
        w32 = weight.to(acc)
        b32 = bias.to(acc) if bias is not None else None
        coef_all = torch.where(valid.reshape(-1), grad_out.reshape(-1).to(acc), torch.zeros_like(lse))
        grad_h = torch.empty(n, shape_h[-1], dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b else None
        chunk = ctx.chunk
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc = h2[s:e]
            g = _softmax_grad_(_chunk_logits(hc, w32, b32), lse[s:e], coef_all[s:e], safe[s:e])
            _accumulate_grads(g, hc, w32, slice(s, e), grad_h, grad_w, grad_b)
            del g
        return (grad_h.view(shape_h).to(hidden.dtype) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None)


def fused_linear_token_logps(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                             ignore_index: int = -100, bias: Optional[torch.Tensor] = None,
                             chunk_size: Optional[int] = None) -> torch.Tensor:
    """fp32 log p(labels) of ``hidden @ lm_head_weight.T (+ bias)`` per token (0 where ignored), shape of
    ``labels``, without materialising the logits in either pass."""
    valid = _check_inputs(hidden, lm_head_weight, labels, bias, ignore_index, chunk_size)
    n = valid.numel()
    chunk = chunk_size or _default_chunk(max(n, 1), hidden.shape[-1], lm_head_weight.shape[0])
    return _FusedTokenLogps.apply(hidden, lm_head_weight, bias, labels, valid, chunk)


def fused_linear_sequence_logps(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                                ignore_index: int = -100, bias: Optional[torch.Tensor] = None,
                                chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-sequence summed log-probs (shape ``labels.shape[:-1]``) for DPO / KLDO, fused with the LM head.

    Equal to ``sequence_logps(hidden @ lm_head_weight.T, labels)``."""
    tok = fused_linear_token_logps(hidden, lm_head_weight, labels, ignore_index=ignore_index, bias=bias,
                                   chunk_size=chunk_size)
    if tok.dim() < 1:
        raise ValueError("labels must have a sequence dimension, got a 0-d tensor")
    return tok.sum(-1)


def fused_linear_sft_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                          objective: str = "nll", alpha: Optional[float] = None, tau: Optional[float] = None,
                          fraction: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean",
                          bias: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                          p: Optional[float] = None) -> torch.Tensor:
    """``sft_loss(hidden @ lm_head_weight.T + bias, labels, ...)`` without materialising the logits.

    ``hidden`` (..., H), ``lm_head_weight`` (V, H), ``labels`` (...) aligned with ``hidden`` (already
    shifted). Logits, log-softmax and gradients are fp32 per chunk of ``chunk_size`` tokens (default:
    see ``_default_chunk``); the gradients returned for
    ``hidden`` / weight / bias have their dtypes. Same objectives, conventions and errors as
    :func:`lowbit.objectives.sft_loss`, including the authors' keys (``"GeneralFamily-8"``, ``"OnlyTopP-0.1"``, ...).
    """
    spec = _check_objective(objective, alpha, tau, fraction, p)
    _check_reduction(reduction)
    valid = _check_inputs(hidden, lm_head_weight, labels, bias, ignore_index, chunk_size)
    n = valid.numel()
    chunk = chunk_size or _default_chunk(max(n, 1), hidden.shape[-1], lm_head_weight.shape[0])
    if reduction == "none":
        logp = _FusedTokenLogps.apply(hidden, lm_head_weight, bias, labels, valid, chunk)
        keep = _keep_mask(logp, valid, spec)
        return _reduce(_token_loss(logp, spec), keep, "none")
    if n == 0:
        warnings.warn("fused_linear_sft_loss: empty input; returning a zero loss", RuntimeWarning, stacklevel=2)
        return hidden.float().sum() * 0.0 + lm_head_weight.float().sum() * 0.0
    return _FusedScalar.apply(hidden, lm_head_weight, bias, labels, valid, spec, reduction, chunk,
                              torch.is_grad_enabled())


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while the mode is active (forward and backward).

    Every storage that an op creates is counted until it is freed (tracked with a weakref finalizer);
    tensors that existed before entering are not counted, so ``peak`` is the extra memory a
    computation needs on top of its inputs. Scratch space inside a kernel is not visible here.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that share an input's storage (views, in-place ops) allocate nothing new.
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                nbytes = st.nbytes()
                key = st.data_ptr()
                if nbytes == 0 or key in self._seen or key in inputs:
                    continue
                self._seen[key] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, nbytes)
        return out
