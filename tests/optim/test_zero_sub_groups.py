"""Stepping like DeepSpeed ZeRO 3 with several sub groups, in one process.

DeepSpeed steps a client optimizer once per sub group: the sub group's flat partition is put in
its parameter group, every other group is left empty, ``step()`` runs, and the group is emptied
again. An optimizer whose clock advanced per call would reset and warm up several times too
early; one with per-tensor statistics must map each partition back to its tensors. Here two
parameter groups are cut into three sub groups (two in the first group) and the flat run must step
exactly like the tensors themselves.
"""
import pytest
import torch

from lowbit.optim import CLASSP, SPAM, StableSPAM
from lowbit.optim.zero import FlatLayout, PartitionLayout, TensorSlice

SHAPES = [(16, 8), (8,), (300,), (12,)]
GROUPS = [[0, 1, 2], [3]]           # parameter groups, as tensor indices
SUB_GROUPS = [(0, [0, 1]), (0, [2]), (1, [3])]  # (parameter group, its tensors): ZeRO 3 sub groups
STEPS = 40
PAD = 3


def stream():
    g = torch.Generator().manual_seed(11)
    out = []
    for t in range(1, STEPS + 1):
        row = [torch.randn(s, generator=g) * 0.01 for s in SHAPES]
        if t in (9, 27):
            row[2].view(-1)[:4] *= 1000  # spikes for the clipping of both optimizers
        out.append(row)
    return out


def make(cls, params, hp):
    return cls([{"params": [params[i] for i in idx]} for idx in GROUPS], **hp)


def run_plain(cls, hp, init, rows):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(cls, params, hp)
    for row in rows:
        for p, x in zip(params, row):
            p.grad = x.clone()
        opt.step()
    return params, opt


def run_zero3(cls, hp, init, rows, layout):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(cls, params, hp)
    flats = [torch.nn.Parameter(torch.cat([params[i].detach().reshape(-1) for i in idx] + [torch.zeros(PAD)]))
             for _, idx in SUB_GROUPS]
    if layout:
        entries = []
        for flat, (_, idx) in zip(flats, SUB_GROUPS):
            tensors, start = [], 0
            for i in idx:
                tensors.append(TensorSlice(params[i].numel(), start, params[i].numel()))
                start += params[i].numel()
            entries.append((flat, FlatLayout(tuple(tensors), None)))
        opt.set_partition_layout(PartitionLayout(entries))
    for group in opt.param_groups:
        group["params"] = []
    for row in rows:
        for flat, (gi, idx) in zip(flats, SUB_GROUPS):  # as stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step
            flat.grad = torch.cat([row[i].reshape(-1) for i in idx] + [torch.zeros(PAD)])
            opt.param_groups[gi]["params"] = [flat]
            opt.step()
            opt.param_groups[gi]["params"] = []
    return flats, opt


CASES = [
    (SPAM, dict(lr=1e-3, weight_decay=0.1, reset_interval=10, warmup_steps=4, clip_delay=3, theta=50.0), False),
    (StableSPAM, dict(lr=1e-3, weight_decay=0.1, reset_interval=10, total_steps=STEPS), True),
    (CLASSP, dict(), True),  # its default threshold is relative to each tensor's mean square
]


@pytest.mark.parametrize("cls,hp,layout", CASES, ids=["SPAM", "StableSPAM", "CLASSP"])
def test_zero3_sub_groups_step_like_the_tensors(cls, hp, layout):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    rows = stream()
    plain, ref = run_plain(cls, hp, init, rows)
    flats, opt = run_zero3(cls, hp, init, rows, layout)
    for flat, (_, idx) in zip(flats, SUB_GROUPS):
        want = torch.cat([plain[i].detach().reshape(-1) for i in idx])
        assert torch.equal(flat.detach()[:-PAD], want)
        assert torch.equal(flat.detach()[-PAD:], torch.zeros(PAD))
    if cls is CLASSP:  # no clock
        assert opt.stats["updated"] == ref.stats["updated"] > 0
        return
    assert all(opt.state[flat]["global_step"] == STEPS for flat in flats)
    assert [grp["global_step"] for grp in opt.param_groups] == [STEPS, STEPS]
    assert ref.stats["clipped"] > 0 and ref.stats["resets"] == 2 * (STEPS // 10)


def test_classp_relative_defaults_need_the_layout():
    """Without `zero.attach` the mean square would be taken over a whole partition: refused; with
    explicit (absolute) values CLASSP is elementwise and steps a partition as it is."""
    init = [torch.zeros(s) for s in SHAPES]
    with pytest.raises(RuntimeError, match=r"zero\.attach"):
        run_zero3(CLASSP, dict(), init, stream()[:1], False)
    flats, opt = run_zero3(CLASSP, dict(threshold=1e-4, eps=1e-8), init, stream()[:3], False)
    assert opt.stats["updated"] > 0


def test_spam_flat_clock_survives_a_state_dict_round_trip():
    hp = CASES[0][1]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    rows = stream()
    full, _ = run_zero3(SPAM, hp, init, rows, False)
    half, opt = run_zero3(SPAM, hp, init, rows[:STEPS // 2], False)
    # DeepSpeed fills the groups with their partitions around state_dict / load_state_dict
    for flat, (gi, _) in zip(half, SUB_GROUPS):
        opt.param_groups[gi]["params"].append(flat)
    sd = opt.state_dict()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt2 = make(SPAM, params, hp)
    flats2 = [torch.nn.Parameter(f.detach().clone()) for f in half]
    for group in opt2.param_groups:
        group["params"] = []
    for flat, (gi, _) in zip(flats2, SUB_GROUPS):
        opt2.param_groups[gi]["params"].append(flat)
    opt2.load_state_dict(sd)
    for group in opt2.param_groups:
        group["params"] = []
    for row in rows[STEPS // 2:]:
        for flat, (gi, idx) in zip(flats2, SUB_GROUPS):
            flat.grad = torch.cat([row[i].reshape(-1) for i in idx] + [torch.zeros(PAD)])
            opt2.param_groups[gi]["params"] = [flat]
            opt2.step()
            opt2.param_groups[gi]["params"] = []
    for a, b in zip(full, flats2):
        assert torch.equal(a.detach(), b.detach())
