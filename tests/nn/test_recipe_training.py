"""Every recipe trains: a 2-layer MLP and a ~0.85M-parameter Llama on CPU, seeds fixed.

Llama: 4 blocks, hidden 128, byte-level text of the standard library (os.py), batch 8 x 64 tokens,
AdamW lr 3e-3 with 20 warm-up steps and cosine decay to 0 at step 200 (the end of a decayed run
is far less noisy than a constant lr); validation loss on held-out bytes.

At this size one run's gap to bf16 is mostly trajectory noise, and it moves with the machine (the
fp32 GEMMs' summation order) and the interpreter (os.py is the data). Measured on one 2-core AMD
EPYC with Python 3.11.7: bf16 over init seeds 0-3: 2.411, 2.522, 2.511, 2.494 (std 0.051, 2.0 %);
fp8-tensorwise over the same seeds: 2.468, 2.624, 2.475, 2.571, per-seed gaps -1.4 % to +4.0 %.
So a recipe's run (seed 0) is compared with the mean of three bf16 seeds, allowing the issue's
gap (fp8-* and mxfp8 2 %, nvfp4 5 %) plus two standard deviations of the bf16 seeds measured in
the same session: a gap inside the noise passes, a broken recipe (a wrong scale costs far more
than that) fails. Every other recipe must at least learn (loss far below the uniform ln 256 = 5.55).
The convergence report (lowbit report convergence) is where recipes are ordered, over seeds.
"""
import dataclasses
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit.nn as N

transformers = pytest.importorskip("transformers")

TEXT = torch.tensor(list(Path(os.__file__).read_bytes()[:120_000]), dtype=torch.long)
SPLIT = int(len(TEXT) * 0.9)
TOLERANCE = {"fp8-tensorwise": 0.02, "fp8-rowwise": 0.02, "fp8-blockwise": 0.02, "mxfp8": 0.02, "nvfp4": 0.05}


def small(recipe: str):
    """The recipe as these layers take it: int4's groups of 256 do not divide their 128 / 384 features, so 64."""
    if recipe != "int4":
        return recipe
    r = N.RECIPES["int4"]
    return dataclasses.replace(r, fprop_input=dataclasses.replace(r.fprop_input, block=(1, 64)),
                               fprop_weight=dataclasses.replace(r.fprop_weight, block=(1, 64)))


def batches(src, seed, n, B=8, S=64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        i = torch.randint(0, len(src) - S - 1, (B,), generator=g).tolist()
        yield torch.stack([src[j:j + S] for j in i])


def train_llama(recipe, steps=200, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = N.convert(transformers.LlamaForCausalLM(cfg), small(recipe))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # linear warm-up then cosine decay to zero: the end of a decayed run is far less noisy than a constant lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    first = None
    for b in batches(TEXT[:SPLIT], 1, steps):
        loss = model(input_ids=b, labels=b).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        val = sum(model(input_ids=b, labels=b).loss.item() for b in batches(TEXT[SPLIT:], 2, 8)) / 8
    return first, val


BF16_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def bf16_llama():
    """(mean, std) of the bf16 validation loss over BF16_SEEDS."""
    vals = [train_llama("bf16", seed=s)[1] for s in BF16_SEEDS]
    return statistics.mean(vals), statistics.stdev(vals)


@pytest.mark.slow
# int4 trains in tests/nn/test_int4_recipe.py: its emulated (dequantized) GEMMs would cost minutes here
@pytest.mark.parametrize("recipe", [r for r in N.RECIPE_NAMES if r not in ("bf16", "int4")])
def test_llama_trains_close_to_bf16(recipe, bf16_llama):
    first, val = train_llama(recipe)
    base, sd = bf16_llama
    assert val < first - 1.5 and val < math.log(256) - 2, (first, val)
    if recipe in TOLERANCE:
        bound = base * (1 + TOLERANCE[recipe]) + 2 * sd
        assert val <= bound, f"{recipe}: {val:.4f} vs bf16 {base:.4f} +- {sd:.4f} (bound {bound:.4f})"


@pytest.mark.parametrize("recipe", N.RECIPE_NAMES)
def test_mlp_loss_falls(recipe):
    """A 2-layer MLP regressing a fixed random teacher: the loss drops by 10x within 150 steps."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 128))
    student = N.convert(nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 128)), small(recipe),
                        keep_high_precision=[])
    assert len(student.lowbit_conversion.converted) == 2
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        x = torch.randn(64, 128, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = (student(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 10, (losses[:3], losses[-3:])
