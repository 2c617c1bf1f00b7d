"""Standard benchmark shapes, taken from real models, in one place.

    from lowbit.bench.shapes import MODELS, select
    for m in select(["llama-1b"]):
        for lin in m.linears(tokens=4096):    # LinearShape(model, name, M=tokens, N=out, K=in)
            ...
        m.mlp(tokens=4096)                    # MLPShape(model, M, hidden, intermediate)
        m.attention(batch=1)                  # AttentionShape(model, batch, heads, kv_heads, seq, head_dim)

Models (hidden / intermediate / heads / kv heads / head dim / layers / vocab / sequence):
  tiny        256 / 768 / 4 / 4 / 64 / 4 / 4096 / 128         lowbit's configs/pretrain/tiny.yaml
  llama-125m  768 / 2048 / 12 / 12 / 64 / 12 / 32000 / 1024   lowbit's configs/pretrain/125m.yaml
  llama-1b    2048 / 5632 / 32 / 4 / 64 / 22 / 32000 / 2048   TinyLlama-1.1B (= configs/pretrain/1b.yaml)
  llama-8b    4096 / 14336 / 32 / 8 / 128 / 32 / 128256 / 8192  Llama-3-8B

The Linear shapes of one decoder layer, as `nn.Linear(K, N)` applied to M = tokens rows:
q_proj (heads*head_dim, hidden), k_proj / v_proj (kv_heads*head_dim, hidden), o_proj (hidden,
heads*head_dim), gate_proj / up_proj (intermediate, hidden), down_proj (hidden, intermediate);
`lm_head` (vocab, hidden) is listed separately by `lm_head()`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearShape:
    model: str
    name: str
    M: int  # tokens (rows of the activation)
    N: int  # out_features
    K: int  # in_features (the reduction dim)

    @property
    def label(self) -> str:
        return f"{self.model} {self.name} {self.M}x{self.N}x{self.K}"

    @property
    def flops(self) -> int:
        """Forward GEMM flops (2 M N K); a training step (fprop + dgrad + wgrad) does 3x this."""
        return 2 * self.M * self.N * self.K


@dataclass(frozen=True)
class MLPShape:
    model: str
    M: int
    hidden: int
    intermediate: int

    @property
    def label(self) -> str:
        return f"{self.model} mlp {self.M}x{self.hidden}->{self.intermediate}"


@dataclass(frozen=True)
class AttentionShape:
    model: str
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"{self.model} attn b{self.batch} h{self.heads}/{self.kv_heads} s{self.seq} d{self.head_dim}"


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    seq: int
    source: str

    def linears(self, tokens: int) -> list[LinearShape]:
        """The distinct Linear shapes of one decoder layer (k_proj and v_proj share one shape)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = [("q_proj", q, self.hidden), ("kv_proj", kv, self.hidden), ("o_proj", self.hidden, q),
                  ("gate_up_proj", self.intermediate, self.hidden), ("down_proj", self.hidden, self.intermediate)]
        out, seen = [], set()
        for name, n, k in shapes:
            if (n, k) in seen:
                continue
            seen.add((n, k))
            out.append(LinearShape(self.name, name, tokens, n, k))
        return out

    def lm_head(self, tokens: int) -> LinearShape:
        return LinearShape(self.name, "lm_head", tokens, self.vocab, self.hidden)

    def mlp(self, tokens: int) -> MLPShape:
        return MLPShape(self.name, tokens, self.hidden, self.intermediate)

    def attention(self, batch: int = 1, seq: int | None = None) -> AttentionShape:
        return AttentionShape(self.name, batch, self.heads, self.kv_heads, seq or self.seq, self.head_dim)

    def layer_params(self) -> int:
        """Weights of one decoder layer's Linears (no norms)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    def params(self) -> int:
        """Linear weights of all layers plus untied embedding and head."""
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden


MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("tiny", 256, 768, 4, 4, 64, 4, 4096, 128, "configs/pretrain/tiny.yaml"),
    ModelShape("llama-125m", 768, 2048, 12, 12, 64, 12, 32000, 1024, "configs/pretrain/125m.yaml"),
    ModelShape("llama-1b", 2048, 5632, 32, 4, 64, 22, 32000, 2048, "TinyLlama-1.1B, configs/pretrain/1b.yaml"),
    ModelShape("llama-8b", 4096, 14336, 32, 8, 128, 32, 128256, 8192, "Llama-3-8B"),
)}

# Token counts (rows M of every activation) for a full run and a --quick run.
TOKENS = 4096
QUICK_TOKENS = 512


def select(names: list[str] | tuple[str, ...] | None, default: tuple[str, ...] = ("llama-125m", "llama-1b", "llama-8b")
           ) -> list[ModelShape]:
    """The models named (each must be a key of MODELS), or `default` when `names` is empty."""
    names = list(names or default)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"shapes: unknown model {unknown[0]!r}; expected some of {', '.join(MODELS)}")
    return [MODELS[n] for n in names]
