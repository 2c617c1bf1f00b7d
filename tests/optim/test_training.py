"""Training behaviour on a tiny fp32 MLP (teacher-student regression, 2.6k parameters).

Every number asserted is measured in the test from runs made in the test: the spiked runs
against the same optimizer's clean run and its own pre-spike loss.
"""
import pytest
import torch

from lowbit.optim import StableSPAM

from _tiny import train

SPIKES = (100, 150)  # 30 % of every gradient's entries x1000 on these steps
LR = 1e-2


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, make in [("adamw", lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0)),
                       ("stable_spam", lambda p: StableSPAM(p, lr=LR, reset_interval=1000))]:
        out[name] = {"clean": train(make, steps=200), "spiked": train(make, steps=200, spikes=SPIKES)}
    return out


def _jump(losses):
    """Worst loss after the first spike relative to the loss just before it."""
    s = SPIKES[0]
    return max(losses[s - 1:]) / losses[s - 2]


def test_adamw_loss_jumps_under_spikes(runs):
    r = runs["adamw"]
    # measured: the loss rises ~12x after the spikes and ends ~4.6x above the clean run
    assert _jump(r["spiked"]) > 5.0
    assert r["spiked"][-1] > 2.0 * r["clean"][-1]


def test_stable_spam_loss_does_not_jump_under_spikes(runs):
    r = runs["stable_spam"]
    # measured: ~1.1x, and the spiked run ends within 1 % of the clean run
    assert _jump(r["spiked"]) < 1.5
    assert r["spiked"][-1] < 1.1 * r["clean"][-1]
    assert _jump(r["spiked"]) < _jump(runs["adamw"]["spiked"]) / 3


@pytest.fixture(scope="module")
def fp32_state_loss():
    return train(lambda p: StableSPAM(p, lr=3e-3, reset_interval=100, state_dtype="fp32"), steps=300)[-1]


@pytest.mark.parametrize("state_dtype", ["bf16", "fp8", "int8"])
def test_low_precision_state_converges_within_2_percent(state_dtype, fp32_state_loss):
    losses = train(lambda p: StableSPAM(p, lr=3e-3, reset_interval=100, state_dtype=state_dtype), steps=300)
    # the run trains (the loss falls by orders of magnitude) and lands within 2 % of fp32 state
    assert losses[-1] < losses[0] / 10
    assert abs(losses[-1] / fp32_state_loss - 1) < 0.02
