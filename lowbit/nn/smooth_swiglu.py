"""SmoothSwiGLU ("Scaling FP8 training to trillion-token LLMs").

Late in FP8 training, single channels of the SwiGLU output grow large (the product of two aligned
linear branches) and overflow or flatten the down-projection's input scale. SmoothSwiGLU divides
each channel of the SwiGLU output by its own scale before the down-projection quantizes it and
multiplies the down-projection's matching weight column by the same scale, so the product is
unchanged in exact arithmetic. Scales are powers of two (the rescale is exact) from the current
batch's per-channel amax, and carry no gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import LowBitLinear


def channel_scales(h: torch.Tensor) -> torch.Tensor:
    """2^round(log2(amax)) per channel (last dim) of `h`; 1 for an all-zero channel."""
    amax = h.detach().reshape(-1, h.shape[-1]).abs().amax(0).float()
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.exp2(torch.round(torch.log2(amax)))


def is_swiglu_mlp(m: nn.Module) -> bool:
    """A Llama / Qwen2 / Mistral style MLP: down(act(gate(x)) * up(x))."""
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and not isinstance(m, SmoothSwiGLU)


class SmoothSwiGLU(nn.Module):
    """Wraps a SwiGLU MLP (same submodules, so the same state-dict keys) with per-channel smoothing."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        if not is_swiglu_mlp(mlp):
            raise TypeError(f"mlp: expected a SwiGLU MLP with gate_proj, up_proj, down_proj and act_fn, got "
                            f"{type(mlp).__name__}")
        if not isinstance(mlp.down_proj, LowBitLinear):
            raise TypeError("mlp: down_proj must be a LowBitLinear (convert the model first)")
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        object.__setattr__(self, "original", mlp)  # not a submodule: unconvert puts it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        s = channel_scales(h)
        return self.down_proj(h / s.to(h.dtype), weight_scale=s)
