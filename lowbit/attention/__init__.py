"""SeerAttention: a learned block-sparse attention gate, self-distilled from a frozen model.

ops.py        attention_with_block_pool, block_sparse_attention (reference: backends/ref/attention.py)
gate.py       AttnGate: pooled Q/K -> block scores
selection.py  block masks by threshold, top-k or density; static and oracle patterns
model.py      gates inside a Hugging Face Llama-style model (transformers AttentionInterface)
distillation.py  self-distillation loop, gate files, apply_seer

The commands `lowbit seer distill | eval` are in lowbit/train/seer.py.
"""
from .distillation import apply_seer, distill, load_gates, save_gates
from .gate import AttnGate
from .model import attach_gates, configure, measured_density
from .ops import attention_with_block_pool, block_sparse_attention
from .selection import by_density, by_threshold, by_topk, density, select

__all__ = ["AttnGate", "apply_seer", "attach_gates", "attention_with_block_pool", "block_sparse_attention",
           "by_density", "by_threshold", "by_topk", "configure", "density", "distill", "load_gates",
           "measured_density", "save_gates", "select"]
