"""lowbit.optim.zero in one process: a flat partition holding whole tensors (what one rank holds
with a data-parallel world of 1) must step exactly like the tensors themselves."""
import copy

import pytest
import torch

from lowbit.optim import StableSPAM, zero
from lowbit.optim.zero import FlatLayout, PartitionLayout, TensorSlice

SHAPES = [(16, 8), (8,), (300,)]
HP = dict(lr=1e-3, weight_decay=0.1, reset_interval=20, total_steps=60)
PAD = 5  # DeepSpeed pads a flat partition at its end


def stream(steps=60):
    g = torch.Generator().manual_seed(7)
    out = []
    for t in range(1, steps + 1):
        row = [torch.randn(s, generator=g) * 0.01 for s in SHAPES]
        if t in (9, 33):
            row[2].view(-1)[:4] *= 1000  # spikes: AdaClip clips
        out.append(row)
    return out


def flat_optimizer(init, layout=True):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = StableSPAM(params, **HP)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(PAD)]))
    opt.param_groups[0]["params"] = [flat]  # as DeepSpeed ZeRO 1/2 does
    if layout:
        tensors, start = [], 0
        for p in params:
            tensors.append(TensorSlice(p.numel(), start, p.numel()))
            start += p.numel()
        opt.set_partition_layout(PartitionLayout([(flat, FlatLayout(tuple(tensors), None))]))
    return opt, flat


def test_flat_partition_steps_like_the_tensors():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    plain = [torch.nn.Parameter(p.clone()) for p in init]
    ref = StableSPAM(plain, **HP)
    opt, flat = flat_optimizer(init)
    for row in stream():
        for p, x in zip(plain, row):
            p.grad = x.clone()
        ref.step()
        flat.grad = torch.cat([x.reshape(-1) for x in row] + [torch.zeros(PAD)])
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in plain])
    assert torch.equal(flat.detach()[:-PAD], got)
    assert torch.equal(flat.detach()[-PAD:], torch.zeros(PAD))  # padding untouched
    assert opt.stats == ref.stats and ref.stats["clipped"] > 0 and ref.stats["resets"] == 3
    # per-tensor statistics live in the flat partition's state, one entry per original tensor
    tensors = opt.state[flat]["tensors"]
    for st, p in zip(tensors, plain):
        assert torch.equal(st["scalars"], ref.state[p]["scalars"])


def test_flat_state_dict_round_trip():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    rows = stream()
    opt, flat = flat_optimizer(init)

    def feed(o, f, part):
        for row in part:
            f.grad = torch.cat([x.reshape(-1) for x in row] + [torch.zeros(PAD)])
            o.step()

    feed(opt, flat, rows[:30])
    sd = copy.deepcopy(opt.state_dict())  # as saved to disk: later steps update the live state in place
    snapshot = flat.detach().clone()
    feed(opt, flat, rows[30:])
    opt2, flat2 = flat_optimizer(init)
    with torch.no_grad():
        flat2.copy_(snapshot)
    opt2.load_state_dict(sd)
    feed(opt2, flat2, rows[30:])
    assert torch.equal(flat.detach(), flat2.detach()) and opt2.stats == opt.stats


def test_flat_partition_without_layout_refuses():
    opt, flat = flat_optimizer([torch.zeros(s) for s in SHAPES], layout=False)
    flat.grad = torch.ones_like(flat)
    with pytest.raises(RuntimeError, match=r"zero\.attach"):
        opt.step()


def test_attach_rejects_what_is_not_an_engine():
    with pytest.raises(TypeError, match="^engine:"):
        zero.attach(object())
