"""SeerAttention in a Hugging Face Llama-style model (Llama, Qwen2, Mistral: q/k/v/o_proj + RoPE).

`attach_gates` adds an `AttnGate` as `self_attn.seer_gate` to every attention layer and switches the
model to the attention function registered here under ATTN_NAME (transformers' AttentionInterface,
its public extension point; nothing in transformers is patched). Each layer's behaviour is set by
its `SeerRuntime` (`self_attn.seer`):
  dense    SDPA (the base model, unchanged)
  distill  exact attention from `attention_with_block_pool`; the gate's KL to the pooled map is stored
  gate     block-sparse attention over the blocks the learned gate selects
  oracle   block-sparse attention over the top blocks of the true pooled map
  static   block-sparse attention over an attention sink plus a sliding window of blocks
The gate sees Q and K before RoPE, as in the official code. The attention function receives them
after RoPE, so it rotates them back with the layer's own cos/sin (captured by a forward pre-hook;
the inverse rotation is exact up to fp32 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import selection
from .gate import AttnGate
from .ops import attention_with_block_pool, block_sparse_attention

ATTN_NAME = "lowbit_seer"
MODES = ("dense", "distill", "gate", "oracle", "static")
_registered = False


@dataclass
class SeerRuntime:
    mode: str = "dense"
    threshold: float | None = None
    density: float | None = None
    topk: int | None = None
    sinks: int = 1
    skip_fraction: float = 0.25  # distill: first quarter of query blocks left out of the loss (official code)
    backend: str | None = None
    rope: tuple | None = field(default=None, repr=False)
    loss: torch.Tensor | None = field(default=None, repr=False)
    selected: int = 0
    causal_blocks: int = 0


def _register() -> None:
    global _registered
    if _registered:
        return
    # lazy: transformers is heavy to import and only the model wiring needs it
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, seer_attention_forward)
    # None for unpadded batches (padding is refused in seer_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
    _registered = True


def attention_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every Llama-style self-attention module."""
    found = [(n, m) for n, m in model.named_modules()
             if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"))]
    if not found:
        raise ValueError("model: no Llama-style attention layers (q_proj, k_proj, v_proj, o_proj, head_dim) found")
    return found


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _capture_rope(module, args, kwargs):
    module.seer.rope = kwargs.get("position_embeddings")


def attach_gates(model, *, block_size: int = 64, gate_dim: int | None = None, q_pool=("avg",),
                 k_pool=("max", "min", "avg")) -> list[AttnGate]:
    """Add a fresh gate to every attention layer (replacing earlier ones) and route attention through it."""
    _register()
    gates = []
    for _, attn in attention_layers(model):
        cfg = attn.config
        dev = attn.q_proj.weight.device
        gate = AttnGate(block_size, attn.head_dim, gate_dim or attn.head_dim, cfg.num_attention_heads,
                        cfg.num_key_value_heads, q_pool, k_pool, rope_theta=rope_theta(cfg)).to(dev)
        attn.seer_gate = gate
        if not hasattr(attn, "seer"):
            attn.seer = SeerRuntime()
            attn.register_forward_pre_hook(_capture_rope, with_kwargs=True)
        gates.append(gate)
    model.set_attn_implementation(ATTN_NAME)
    return gates


def runtimes(model) -> list[SeerRuntime]:
    rts = [m.seer for _, m in attention_layers(model) if hasattr(m, "seer")]
    if not rts:
        raise ValueError("model: no SeerAttention gates attached (call attach_gates or apply_seer first)")
    return rts


def configure(model, mode: str, *, threshold=None, density=None, topk=None, sinks: int = 1, backend=None) -> None:
    """Set every layer's mode and block-selection rule (exactly one of threshold/density/topk for sparse modes)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    rules = [r for r in (threshold, density, topk) if r is not None]
    if mode in ("gate", "oracle", "static") and len(rules) != 1:
        raise ValueError(f"mode {mode!r}: give exactly one of threshold, density, topk")
    if mode in ("oracle", "static") and threshold is not None:
        raise ValueError(f"threshold: mode {mode!r} selects by density or topk (its scores are not gate scores)")
    for rt in runtimes(model):
        rt.mode, rt.threshold, rt.density, rt.topk, rt.sinks, rt.backend = mode, threshold, density, topk, sinks, backend
        rt.loss, rt.selected, rt.causal_blocks = None, 0, 0


def measured_density(model) -> float:
    """Selected / causal blocks over every sparse attention call since `configure`."""
    sel = sum(rt.selected for rt in runtimes(model))
    tot = sum(rt.causal_blocks for rt in runtimes(model))
    if tot == 0:
        raise ValueError("measured_density: no block-sparse attention has run since configure()")
    return sel / tot


def unrotate(x: torch.Tensor, rope) -> torch.Tensor:
    """Undo Llama's rotate-half RoPE: x [B, H, S, D], cos/sin [B, S, d_rot] (d_rot <= D)."""
    if rope is None:
        return x
    cos, sin = (t.unsqueeze(1).to(torch.float32) for t in rope)
    d = cos.shape[-1]
    xr, rest = x[..., :d].float(), x[..., d:].float()
    x1, x2 = xr[..., : d // 2], xr[..., d // 2:]
    back = (xr * cos - torch.cat((-x2, x1), -1) * sin) / (cos * cos + sin * sin)  # scaled RoPE variants too
    return torch.cat((back, rest), -1)


def kl_loss(pooled: torch.Tensor, logits: torch.Tensor, skip_fraction: float) -> torch.Tensor:
    """Mean over (batch, head, query block) of KL(pooled row || softmax(logits row))."""
    start = int(logits.shape[-2] * skip_fraction)
    if start >= logits.shape[-2]:
        start = 0
    p = pooled[:, :, start:].float()
    logq = torch.log_softmax(logits[:, :, start:], dim=-1)
    return (torch.xlogy(p, p) - p * logq).sum(-1).mean()


def seer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hk, S, D] after RoPE -> ([B, S, Hq, D], None)."""
    rt: SeerRuntime = module.seer
    if attention_mask is not None:
        raise ValueError("SeerAttention: padded batches are not supported; pass unpadded (packed) sequences")
    S, Sk = query.shape[2], key.shape[2]
    if rt.mode == "dense" or S != Sk:
        # decoding steps (S < Sk, a KV cache) attend densely, as the official prefill gate does
        causal = S == Sk and S > 1
        if S != Sk and S != 1:
            raise ValueError("SeerAttention: chunked prefill with a cache is not supported (one token at a time)")
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    gate: AttnGate = module.seer_gate
    bs = gate.block_size
    pos = kwargs.get("position_ids")
    if rt.mode == "distill":
        with torch.no_grad():
            out, pooled = attention_with_block_pool(query.detach(), key.detach(), value.detach(), bs, True, scaling,
                                                    backend=rt.backend)
        logits = gate.logits(unrotate(query, rt.rope).detach(), unrotate(key, rt.rope).detach(), pos)
        rt.loss = kl_loss(pooled, logits, rt.skip_fraction)
        return out.transpose(1, 2).contiguous(), None

    with torch.no_grad():
        B, H = query.shape[:2]
        n = -(-S // bs)
        if rt.mode == "gate":
            scores = gate(unrotate(query, rt.rope), unrotate(key, rt.rope), pos)
        elif rt.mode == "oracle":
            scores = attention_with_block_pool(query, key, value, bs, True, scaling, backend=rt.backend)[1]
        else:
            scores = selection.static_scores(B, H, n, rt.sinks, device=query.device)
        mask = selection.select(scores, threshold=rt.threshold, density=rt.density, topk=rt.topk)
        rt.selected += int(mask.sum())
        rt.causal_blocks += B * H * n * (n + 1) // 2
        out = block_sparse_attention(query, key, value, mask, bs, True, scaling, backend=rt.backend)
    return out.transpose(1, 2).contiguous(), None
