"""convert / unconvert on transformers models (Llama, Qwen2, GPT-2 Conv1D) and plain module trees."""
import logging

import pytest
import torch
from torch import nn

import lowbit.nn as N

transformers = pytest.importorskip("transformers")


def tiny_llama(layers=4, hidden=128, inter=384):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def linear_names(model, cls):
    return sorted(n for n, m in model.named_modules() if type(m) is cls)


def test_llama_counts_and_default_keep():
    m = tiny_llama()
    N.convert(m, "nvfp4")
    s = m.lowbit_conversion
    # 7 Linears per block x 4 blocks + lm_head; nvfp4 keeps ceil(0.15 * 4) = 1 block and the head
    assert len(s.converted) == 21 and len(s.kept) == 8
    assert all(n.startswith("model.layers.3.") for n in s.kept if n != "lm_head") and "lm_head" in s.kept
    assert linear_names(m, N.LowBitLinear) == sorted(s.converted)
    assert "21 Linear layers converted" in str(s)


def test_skip_and_keep_lists():
    m = tiny_llama()
    N.convert(m, "fp8-tensorwise", skip=["*.self_attn.*"], keep_high_precision=["model.layers.0"])
    s = m.lowbit_conversion
    assert all(s.kept[n] == "skip list" for n in s.kept if ".self_attn." in n)
    assert s.kept["model.layers.0.mlp.up_proj"] == "keep_high_precision"
    assert "lm_head" in s.converted  # an explicit keep list replaces the recipe's default
    assert len(s.converted) == 3 * 3 + 1


def test_indivisible_layer_kept_with_reason_or_strict_error(caplog):
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 100))
    with caplog.at_level(logging.WARNING, logger="lowbit.nn.convert"):
        N.convert(model, "fp8-blockwise")
    assert model.lowbit_conversion.converted == ["0"]
    assert "multiple of 128" in model.lowbit_conversion.kept["2"] and "stays in high precision" in caplog.text
    with pytest.raises(ValueError, match="2: recipe fp8-blockwise cannot quantize Linear\\(128, 100\\)"):
        N.convert(nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 100)), "fp8-blockwise", strict=True)


def test_state_dict_round_trip_and_save_pretrained(tmp_path):
    m = tiny_llama(layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    N.convert(m, "mxfp8")
    assert list(m.state_dict()) == list(before) and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    ids = torch.randint(0, 256, (2, 32))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    m.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in m.state_dict().items())
    # and a plain checkpoint loads into a converted model
    again = N.convert(tiny_llama(layers=2), "mxfp8")
    again.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, m(input_ids=ids).logits)


def test_unconvert_restores_plain_modules_and_bf16_is_exact():
    m = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    names = linear_names(m, nn.Linear)
    N.convert(m, "bf16", smooth_swiglu=False)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref)
    N.unconvert(m)
    assert linear_names(m, nn.Linear) == names and not linear_names(m, N.LowBitLinear)
    assert not hasattr(m, "lowbit_conversion")
    with pytest.raises(ValueError, match="already converted"):
        N.convert(N.convert(m, "mxfp8"), "mxfp8")


def test_gpt2_conv1d():
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                              n_positions=32, bos_token_id=0, eos_token_id=0))
    g.eval()  # no dropout
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = g(input_ids=ids).logits
    keys = list(g.state_dict())
    N.convert(g, "bf16")
    assert len(g.lowbit_conversion.converted) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(g.get_submodule(n).transposed_weight for n in g.lowbit_conversion.converted)
    assert list(g.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(g(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    N.unconvert(g)
    assert type(g.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    N.convert(g, "fp8-tensorwise")
    loss = g(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and g.transformer.h[0].mlp.c_fc.weight.grad is not None


def test_qwen2_and_smooth_swiglu():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    q = transformers.Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, 256, (2, 16))
    keys = list(q.state_dict())
    N.convert(q, "fp8-tensorwise", smooth_swiglu=True)
    assert q.lowbit_conversion.smoothed == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(q.model.layers[0].mlp, N.SmoothSwiGLU) and list(q.state_dict()) == keys
    out = q(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and q.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    N.unconvert(q)
    assert type(q.model.layers[0].mlp).__name__ == "Qwen2MLP"


def test_smooth_swiglu_is_exact_rescaling_and_helps_with_channel_outliers():
    """h / s with W * s is the same product; with one channel 2^16 larger than the rest, per-tensor FP8
    pushes the other channels into subnormals, and SmoothSwiGLU gives them back their precision. (The
    outlier channel's weights are zeroed so the error measured is the other channels'.)"""
    torch.manual_seed(1)
    down = N.LowBitLinear(64, 32, bias=False, recipe="fp8-tensorwise")
    with torch.no_grad():
        down.weight[:, 5] = 0
    h = torch.randn(128, 64)
    h[:, 5] *= 2.0**16
    from lowbit.nn.smooth_swiglu import channel_scales

    s = channel_scales(h)
    assert torch.equal((h / s) * s, h)  # powers of two: exact
    exact = h.double() @ down.weight.detach().double().t()
    err_plain = (down(h).double() - exact).norm()
    err_smooth = (down(h / s, weight_scale=s).double() - exact).norm()
    assert err_smooth < err_plain / 4, (err_smooth, err_plain)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        N.convert("not a model", "mxfp8")
    with pytest.raises(ValueError, match="unknown recipe"):
        N.convert(nn.Linear(32, 32), "int3")
