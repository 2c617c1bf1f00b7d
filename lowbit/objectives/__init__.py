"""SFT and alignment objectives, a memory-lean fused LM head + loss, and the safety separation metric.

- :func:`sft_loss`: NLL and the probability-based family of "Beyond Log Likelihood" under lowbit's names
  and the authors' keys (table in :mod:`lowbit.objectives.family`); :func:`auto_objective` /
  :func:`prior_strength` pick one from the base model's prior.
- :func:`sequence_logps`, :func:`dpo_loss` (f-DPO divergences), :func:`kldo_loss` (KLDO), :func:`kto_loss`
  (KTO), :func:`bco_loss` (BCO).
- :func:`fused_linear_sft_loss`, :func:`fused_linear_sequence_logps`: the same without materialising logits.
- :func:`separation`, :func:`prompt_separation`, :func:`separation_regression`: how far a model's hidden
  states set safe and harmful prompts apart (KLDO paper), with significance tests.
"""
from .family import OBJECTIVES, PAPER_KEYS, ObjectiveSpec, is_objective, parse_objective
from .fused import (TensorMemoryTracker, fused_linear_sequence_logps, fused_linear_sft_loss,
                    fused_linear_token_logps)
from .preference import (DIVERGENCES, BCORunningMean, KLDORunningMean, bco_loss, dpo_loss, kldo_loss,
                         kto_kl_completions, kto_loss, sequence_logps)
from .prior import AutoObjective, PriorStrength, auto_objective, prior_strength
from .separation import (bhattacharyya_distance, hidden_representations, prompt_separation, separation,
                         separation_regression, silhouette_score)
from .sft import sft_loss

__all__ = [
    "OBJECTIVES", "PAPER_KEYS", "ObjectiveSpec", "parse_objective", "is_objective", "DIVERGENCES", "sft_loss",
    "auto_objective", "AutoObjective", "prior_strength", "PriorStrength", "sequence_logps", "dpo_loss",
    "kldo_loss", "KLDORunningMean", "kto_loss", "kto_kl_completions", "bco_loss", "BCORunningMean",
    "fused_linear_sft_loss", "fused_linear_token_logps", "fused_linear_sequence_logps", "TensorMemoryTracker",
    "separation", "prompt_separation", "separation_regression", "bhattacharyya_distance", "silhouette_score",
    "hidden_representations",
]
