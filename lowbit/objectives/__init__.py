"""SFT and alignment objectives, and a memory-lean fused LM head + loss.

- :func:`sft_loss`: NLL and the probability-based family of "Beyond Log Likelihood"
  (``neg_p``, ``f_alpha``, ``threshold``, ``top_p``, ``bottom_p``); :func:`prior_strength` picks one.
- :func:`sequence_logps`, :func:`dpo_loss` (f-DPO divergences), :func:`kldo_loss` (KLDO).
- :func:`fused_linear_sft_loss`, :func:`fused_linear_sequence_logps`: the same without materialising logits.
"""
from .fused import (TensorMemoryTracker, fused_linear_sequence_logps, fused_linear_sft_loss,
                    fused_linear_token_logps)
from .preference import DIVERGENCES, KLDORunningMean, dpo_loss, kldo_loss, sequence_logps
from .sft import OBJECTIVES, PriorStrength, prior_strength, sft_loss

__all__ = [
    "OBJECTIVES", "DIVERGENCES", "sft_loss", "prior_strength", "PriorStrength", "sequence_logps", "dpo_loss",
    "kldo_loss", "KLDORunningMean", "fused_linear_sft_loss", "fused_linear_token_logps",
    "fused_linear_sequence_logps", "TensorMemoryTracker",
]
