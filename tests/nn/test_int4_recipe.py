"""The `int4` recipe: Stable-SPAM's INT4 set-up in LowBitLinear (fprop on x^ W^, dgrad dy W^, wgrad dy^T x^).

The official layer (QLinear + A8Linear in TianjinYellow/StableSPAM's utils/act_weight_quantization.py)
is transcribed here with the formulas of tests/ops/test_int4.py; with nearest rounding the layer
must reproduce it, outputs and gradients.
"""
import dataclasses
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit.nn as N
from lowbit.nn.recipe import Operand

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_int4 import official_act, official_weight  # noqa: E402


def official_linear(x, w, b, group):
    """QLinear.forward + A8Linear (fp32): W^ with a straight-through gradient, x^ saved for backward."""
    w_hat = official_weight(w.detach(), group)[0]
    x_hat = official_act(x.detach(), group)[0]
    y = x_hat @ w_hat.t() + b.detach()
    return y, w_hat, x_hat


@pytest.mark.parametrize("group", [256, 64])
def test_layer_is_the_official_layer(group):
    recipe = dataclasses.replace(N.get_recipe("int4"), fprop_input=Operand("int4_act", (1, group)),
                                 fprop_weight=Operand("int4_weight", (1, group)))
    torch.manual_seed(0)
    layer = N.LowBitLinear(512, 48, recipe=recipe)
    x = (torch.randn(2, 5, 512) * torch.linspace(0.1, 4, 512)).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    want, w_hat, x_hat = official_linear(x, layer.weight, layer.bias, group)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, dy @ w_hat, rtol=1e-6, atol=1e-6)  # dgrad reads W^
    torch.testing.assert_close(layer.weight.grad, dy.reshape(-1, 48).t() @ x_hat.reshape(-1, 512), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, dy.reshape(-1, 48).sum(0))


def test_default_recipe():
    r = N.get_recipe("int4")
    assert r.fprop_input == Operand("int4_act", (1, 256), "stochastic") and r.fprop_weight == Operand("int4_weight", (1, 256))
    assert r.gemm("dgrad") == (None, None) and r.gemm("wgrad") == (None, None) and r.backward_operands == "dequantized"
    assert r.shape_problem(256, 8) is None and r.shape_problem(128, 8) is not None
    layer = N.LowBitLinear(256, 16, recipe="int4")
    x = torch.randn(8, 256, requires_grad=True)
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)  # stochastic rounding: a fresh seed per call
    (y1.sum() + y2.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_recipe_validation():
    with pytest.raises(ValueError, match="backward_operands"):
        N.Recipe("x", backward_operands="master")
    with pytest.raises(ValueError, match="backward_operands"):
        N.Recipe("x", backward_operands="dequantized")
    with pytest.raises(ValueError, match="hadamard"):
        Operand("int4_act", (1, 256), hadamard=16)
    with pytest.raises(ValueError, match="INT4"):
        N.Recipe("x", dgrad_grad=Operand("int4_act", (1, 32)), dgrad_weight=Operand("int4_weight", (1, 32)))


def test_tiny_llama_trains():
    """A 2-block Llama (hidden 256) on byte-level text: every projection in INT4, loss falls well below uniform."""
    transformers = pytest.importorskip("transformers")
    text = torch.tensor(list(Path(os.__file__).read_bytes()[:40_000]), dtype=torch.long)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = N.convert(transformers.LlamaForCausalLM(cfg), "int4")
    assert len(model.lowbit_conversion.converted) == 14  # q k v o gate up down per block; the head stays
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        i = torch.randint(0, len(text) - 33, (8,), generator=g).tolist()
        b = torch.stack([text[j:j + 32] for j in i])
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(256) - 0.5 and sum(losses[-5:]) / 5 < math.log(256) - 2, losses


def test_training_config_takes_it():
    """`quant.recipe=int4` in a training config: the tiny model's 256 / 768 features take groups of 256."""
    from lowbit.train import load

    tiny = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "tiny.yaml"
    cfg = load([str(tiny)], ["quant.recipe=int4", "quant.strict=true"], task="pretrain")
    assert cfg.quant.recipe == "int4"
