"""Gates inside a tiny Llama: modes, inverse RoPE, gradients only into gates, KL falls, gate files."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit.attention import (apply_seer, attach_gates, configure, distill, load_gates,  # noqa: E402
                              measured_density, save_gates)
from lowbit.attention import model as seer_model  # noqa: E402
from lowbit.attention.distillation import distill_loss, evaluate_kl  # noqa: E402

VOCAB, SEQ = 128, 128


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    # a large init range gives peaked attention maps, so the gate has something to learn
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (batch, SEQ), generator=g)


@pytest.fixture(scope="module")
def ids():
    return next(token_batches(100))


def test_dense_and_distill_modes_leave_the_model_unchanged(ids):
    m = tiny_llama()
    with torch.no_grad():
        ref = m(ids).logits
        attach_gates(m, block_size=16, gate_dim=16)
        torch.testing.assert_close(m(ids).logits, ref, atol=0, rtol=0)  # dense: the same SDPA call
        configure(m, "distill")
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=0)
        configure(m, "gate", density=1.0)
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=0)
        assert measured_density(m) == 1.0
        configure(m, "gate", density=0.3)
        out = m(ids).logits
        assert abs(measured_density(m) - 0.3) < 0.05
        assert (out - ref).abs().max() > 1e-3  # sparse attention changes the result


def test_unrotate_recovers_pre_rope_q():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny_llama()
    rope = m.model.rotary_emb(torch.zeros(1), torch.arange(40)[None])
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    qr, kr = apply_rotary_pos_emb(q, k, *rope)
    torch.testing.assert_close(seer_model.unrotate(qr, rope), q, atol=1e-5, rtol=0)
    torch.testing.assert_close(seer_model.unrotate(kr, rope), k, atol=1e-5, rtol=0)


def test_gradients_flow_only_into_gates(ids):
    m = tiny_llama()
    attach_gates(m, block_size=16, gate_dim=16)
    from lowbit.attention.distillation import freeze_base

    gate_params = {id(p) for p in freeze_base(m)}
    configure(m, "distill")
    distill_loss(m, ids).backward()
    for name, p in m.named_parameters():
        if id(p) in gate_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_short_distillation_lowers_the_kl(tmp_path):
    m = tiny_llama()
    attach_gates(m, block_size=16, gate_dim=16)
    held_out = [next(token_batches(7)) for _ in range(2)]
    before = evaluate_kl(m, held_out)
    logs = []
    hist = distill(m, token_batches(1), steps=25, lr=1e-2, warmup=2, log=logs.append, log_every=5)
    after = evaluate_kl(m, held_out)
    assert len(hist) == 25 and logs[-1]["step"] == 25
    assert after < 0.7 * before, (before, after)

    path = tmp_path / "gates.pt"
    save_gates(m, str(path))
    assert path.stat().st_size < 100_000  # gate weights only
    fresh = tiny_llama()  # same base weights (same seed), no gates
    load_gates(fresh, str(path))
    torch.testing.assert_close(evaluate_kl(fresh, held_out), after, atol=1e-6, rtol=0)


def test_apply_seer_and_gate_file_checks(tmp_path, ids):
    m = tiny_llama()
    attach_gates(m, block_size=16, gate_dim=16)
    path = str(tmp_path / "g.pt")
    save_gates(m, path)
    other = tiny_llama()
    apply_seer(other, path, threshold=0.05)
    with torch.no_grad():
        other(ids)
    assert 0 < measured_density(other) <= 1
    with pytest.raises(ValueError, match="exactly one"):
        apply_seer(tiny_llama(), path)
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="gates_path"):
        load_gates(tiny_llama(), str(tmp_path / "bad.pt"))


def test_padding_is_refused(ids):
    m = tiny_llama()
    attach_gates(m, block_size=16, gate_dim=16)
    configure(m, "gate", density=0.5)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="padded"):
        m(ids, attention_mask=mask)
