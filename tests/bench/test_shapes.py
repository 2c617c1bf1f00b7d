"""lowbit.bench.shapes: the standard shapes are the real models' shapes."""
import pytest

from lowbit.bench import shapes


def test_parameter_counts_match_the_models():
    # Llama-3-8B: 8.03 B parameters; TinyLlama-1.1B: 1.10 B (untied embedding and head, norms excluded)
    assert shapes.MODELS["llama-8b"].params() == pytest.approx(8.03e9, rel=0.002)
    assert shapes.MODELS["llama-1b"].params() == pytest.approx(1.10e9, rel=0.002)


def test_linear_shapes_of_a_gqa_model():
    lins = {s.name: (s.M, s.N, s.K) for s in shapes.MODELS["llama-8b"].linears(4096)}
    assert lins == {"q_proj": (4096, 4096, 4096), "kv_proj": (4096, 1024, 4096),
                    "gate_up_proj": (4096, 14336, 4096), "down_proj": (4096, 4096, 14336)}  # o_proj = q_proj's shape
    head = shapes.MODELS["llama-8b"].lm_head(8)
    assert (head.N, head.K, head.flops) == (128256, 4096, 2 * 8 * 128256 * 4096)
    att = shapes.MODELS["llama-1b"].attention(batch=2)
    assert (att.heads, att.kv_heads, att.head_dim, att.seq) == (32, 4, 64, 2048)
    assert shapes.MODELS["tiny"].mlp(16).intermediate == 768


def test_select():
    assert [m.name for m in shapes.select([])] == ["llama-125m", "llama-1b", "llama-8b"]
    assert [m.name for m in shapes.select(["tiny"], default=("llama-8b",))] == ["tiny"]
    with pytest.raises(ValueError, match="llama-70b"):
        shapes.select(["llama-70b"])
