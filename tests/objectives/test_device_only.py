"""The SFT losses read nothing back to the host on an accelerator (on a GPU every such read is a sync
inside the training step). Tensors on the `meta` device have no values, so any read of one raises:
forward and backward on them run only where nothing is read."""
import pytest
import torch

from lowbit.objectives import sft_loss
from lowbit.objectives.fused import fused_linear_sft_loss

META = torch.device("meta")
CASES = [("nll", {}), ("neg_p", {}), ("f_alpha", {"alpha": 0.5}), ("threshold", {}),
         ("top_fraction", {"fraction": 0.5}), ("bottom_fraction", {"fraction": 0.5})]


@pytest.mark.parametrize("objective, kw", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sft_loss_reads_nothing_back(objective, kw, reduction):
    logits = torch.randn(2, 5, 11, device=META, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), device=META)
    sft_loss(logits, labels, objective=objective, reduction=reduction, **kw).sum().backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("objective, kw", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_sft_loss_reads_nothing_back(objective, kw, reduction):
    hidden = torch.randn(2, 5, 8, device=META, requires_grad=True)
    weight = torch.randn(11, 8, device=META, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), device=META)
    fused_linear_sft_loss(hidden, weight, labels, objective=objective, reduction=reduction, chunk_size=4,
                          **kw).sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_top_fraction_keeps_ceil_of_the_valid_tokens():
    """k = min(n, max(1, ceil(fraction n))) of the n valid tokens, those with the highest log p."""
    logits = torch.randn(1, 7, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1, -100, 2, 3, -100, 4]])
    per_token = sft_loss(logits, labels, objective="top_fraction", fraction=0.5, reduction="none")
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    valid = labels != -100
    expect = torch.topk(logp[valid], 3).indices  # ceil(0.5 * 5) = 3
    kept = (per_token[valid] != 0).nonzero().flatten()
    assert sorted(kept.tolist()) == sorted(expect.tolist())
