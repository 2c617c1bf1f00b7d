"""Suite `loss`: the LM-head loss step (forward + backward), fused vs materialised logits.

lowbit's case is `lowbit.objectives.fused_linear_sft_loss` (chunked; the logits never exist). Peers
compute the same loss of `hidden @ weight.T` and the gradients of hidden and weight:
  torch    F.cross_entropy on materialised logits (nll only)
  unfused  lowbit.objectives.sft_loss on materialised logits (fp32 log-softmax)
  liger    Liger-Kernel's LigerFusedLinearCrossEntropyLoss (nll only)
Shapes: each model's vocab and hidden size at ctx.tokens tokens (default llama-125m: vocab 32000,
hidden 768; --quick: tiny). work = 6 N V H flops (one GEMM forward, two backward), limit fp32 mm.
Peak memory: bytes of tensor storage live at once during the first (warm-up) run, tracked per
allocation with lowbit.objectives.TensorMemoryTracker (inputs excluded), in the peak_* columns.
A materialised-logits peer whose logits would exceed MEM_LIMIT_GIB is skipped and says so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives import TensorMemoryTracker, fused_linear_sft_loss, sft_loss
from .suite import Context, Row

DESCRIPTION = "LM-head loss forward + backward: fused (no logits) vs materialised logits (vs torch, Liger)"
PARAMS = ("vocab", "tokens", "hidden", "objective", "peak_mib", "peak_unfused_mib", "peak_torch_mib",
          "peak_liger_mib")
PEERS = {"torch": None, "unfused": None, "liger": "liger_kernel"}
OBJECTIVES = ("nll",)
MEM_LIMIT_GIB = 12.0


def liger_loss():
    try:  # an optional peer, reported "absent" when it does not import
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss()


def make_step(method: str, h, w, y, objective: str, liger=None):
    def step():
        h.grad = None
        w.grad = None
        if method == "torch":
            loss = F.cross_entropy(h @ w.t(), y)
        elif method == "unfused":
            loss = sft_loss(h @ w.t(), y, objective=objective)
        elif method == "fused":
            loss = fused_linear_sft_loss(h, w, y, objective=objective)
        elif method == "liger":
            loss = liger(w, h, y)
        else:
            raise ValueError(f"method: unknown {method!r}")
        loss.backward()
    return step


def measure(ctx: Context, step, label: str):
    """(timing, peak bytes): the warm-up run doubles as the memory run; then single-call samples."""
    with TensorMemoryTracker() as tracker:
        step()
    return ctx.time(step, label, warmup=0, min_runs=2, min_time=0.0), tracker.peak


def run(ctx: Context) -> list[Row]:
    liger = liger_loss()
    rows = []
    for model in ctx.models(default=("llama-125m",), quick=("tiny",)):
        n, vocab, hidden = ctx.tokens, model.vocab, model.hidden
        for objective in OBJECTIVES:
            g = torch.Generator().manual_seed(0)
            h = torch.randn(n, hidden, generator=g).to(ctx.device).requires_grad_(True)
            w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(ctx.device).requires_grad_(True)
            y = torch.randint(0, vocab, (n,), generator=g).to(ctx.device)
            materialised_gib = 3 * n * vocab * 4 / 2 ** 30  # logits, log-softmax and its gradient in fp32
            t, peak = measure(ctx, make_step("fused", h, w, y, objective), "fused")
            params = dict(vocab=vocab, tokens=n, hidden=hidden, objective=objective, peak_mib=peak / 2 ** 20)
            peers = {}
            for peer in PEERS:
                if peer in ("torch", "liger") and objective != "nll":
                    peers[peer] = "n/a"
                elif peer == "liger" and liger is None:
                    peers[peer] = "absent"
                elif peer != "liger" and materialised_gib > MEM_LIMIT_GIB:
                    peers[peer] = f"skipped: ~{materialised_gib:.0f} GiB of logits"
                else:
                    pt, ppeak = measure(ctx, make_step(peer, h, w, y, objective, liger), peer)
                    peers[peer] = pt
                    params[f"peak_{peer}_mib"] = ppeak / 2 ** 20
            rows.append(Row(f"fused {objective}", t, shape=f"{n}x{hidden} @ {vocab}x{hidden}", dtype="float32",
                            work=6 * n * vocab * hidden, unit="TFLOP/s", limit="fp32_mm_TFLOP/s", peers=peers,
                            params=params, backend="torch"))
            ctx.console(f"loss {model.name} {objective}: fused p50 {t.p50:.3f} s, peak {peak / 2 ** 20:.1f} MiB")
    return rows
