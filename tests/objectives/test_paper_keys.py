"""The authors' objective keys against a transcription of their trainer, on the unfused and fused paths.

`authors_loss` below transcribes the loss block of `_compute_loss_and_backward` in
main_verl/trainer/fsdp_sft_trainer.py of github.com/GaotangLi/Beyond-Log-Likelihood (non-sequence-parallel
branch): per-token losses from `F.log_softmax(logits.float())` or `nn.CrossEntropyLoss(reduction="none")`,
the threshold folded into `loss_mask`, and `sum(loss) / (sum(loss_mask) + 1e-8)`.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit.objectives.family as family
from lowbit.objectives import (OBJECTIVES, PAPER_KEYS, fused_linear_sft_loss, is_objective, parse_objective,
                               sft_loss)


def authors_loss(logits, labels, objective_trans, upcast=torch.float32):
    """Their computation on (N, V) logits and (N,) labels; -100 marks what their `loss_mask` zeroes."""
    loss_mask = (labels != -100).to(upcast)
    shift_labels = labels.clamp(min=0)  # their labels are real token ids under a zero loss_mask
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    if objective_trans == "original":
        loss = loss_fct(logits, shift_labels) * loss_mask
    else:
        log_p_true = F.log_softmax(logits.to(upcast), dim=-1).gather(1, shift_labels.unsqueeze(-1)).squeeze(-1)
        prob_coefficients = log_p_true.exp()
        if objective_trans == "p":
            loss = (1 - prob_coefficients) * loss_mask
        elif objective_trans == "logp":
            loss = -log_p_true * loss_mask
        elif "GeneralFamily" in objective_trans:
            q = float(objective_trans.split("-")[1])
            loss = -(torch.exp(q * log_p_true) - 1) / q * loss_mask
        elif "OnlyTopP" in objective_trans:
            loss_mask = loss_mask * (prob_coefficients >= float(objective_trans.split("-")[1]))
            loss = (1 - prob_coefficients) * loss_mask
        elif "OnlyBottomP" in objective_trans:
            loss_mask = loss_mask * (prob_coefficients <= float(objective_trans.split("-")[1]))
            loss = (1 - prob_coefficients) * loss_mask
        elif "OnlyTopLogP" in objective_trans:
            loss_mask = loss_mask * (prob_coefficients >= float(objective_trans.split("-")[1]))
            loss = loss_fct(logits, shift_labels) * loss_mask
        elif "OnlyBottomLogP" in objective_trans:
            loss_mask = loss_mask * (prob_coefficients <= float(objective_trans.split("-")[1]))
            loss = loss_fct(logits, shift_labels) * loss_mask
        else:
            raise ValueError(objective_trans)
    return torch.sum(loss) / (torch.sum(loss_mask) + 1e-8), int(loss_mask.sum())


KEYS = ["original", "p", "logp", "GeneralFamily-8", "GeneralFamily-0.5", "OnlyTopP-0.1", "OnlyTopP-0",
        "OnlyBottomP-0.3", "OnlyBottomP-1", "OnlyTopLogP-0.2", "OnlyBottomLogP-0.05"]
THRESHOLDS = [0.1, 0.3, 0.2, 0.05]


def make(n_tok=96, vocab=13, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (n_tok,), generator=g)
    labels[1::3] = logits[1::3].argmax(-1)  # a spread of target probabilities from ~0 to ~1
    labels[::7] = -100
    p = torch.softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)[labels != -100]
    # No target sits on a threshold, where float rounding could decide membership.
    assert min(float((p - q).abs().min()) for q in THRESHOLDS) > 1e-4
    return logits.to(dtype), labels


def denominator_tol(kept):
    # They divide by (kept + 1e-8), lowbit by kept: a relative difference of 1e-8 / kept.
    return 1e-8 / max(kept, 1) + 1e-12


@pytest.mark.parametrize("key", KEYS)
def test_value_and_gradient_match_the_authors_fp64(key):
    logits, labels = make()
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    want, kept = authors_loss(z1, labels, key, upcast=torch.float64)
    got = sft_loss(z2, labels, objective=key)
    n_valid = int((labels != -100).sum())
    if key.startswith("Only") and key not in ("OnlyTopP-0", "OnlyBottomP-1"):
        assert 0 < kept < n_valid  # the threshold really selects
    tol = denominator_tol(kept)
    assert got.item() == pytest.approx(want.item(), rel=tol, abs=1e-15)
    (g_want,) = torch.autograd.grad(want, z1)
    (g_got,) = torch.autograd.grad(got, z2)
    assert torch.allclose(g_got, g_want, rtol=tol, atol=1e-15)


@pytest.mark.parametrize("key", KEYS)
def test_fp32_matches_the_authors_fp32(key):
    # Their trainer upcasts the (bf16) logits with .float(); fp32 logits go through both unchanged.
    logits, labels = make(dtype=torch.float32, seed=1)
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    want, _ = authors_loss(z1, labels, key)
    got = sft_loss(z2, labels, objective=key)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=2e-6, abs=1e-7)
    (g_want,) = torch.autograd.grad(want, z1)
    (g_got,) = torch.autograd.grad(got, z2)
    assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key", KEYS)
def test_fused_lm_head_matches_the_authors(key):
    g = torch.Generator().manual_seed(2)
    n, hid, vocab = 80, 6, 17
    h = torch.randn(2, n // 2, hid, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(vocab, hid, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    y = torch.randint(0, vocab, (2, n // 2), generator=g)
    with torch.no_grad():
        y[:, ::2] = (h @ w.t())[:, ::2].argmax(-1)
    y[:, :3] = -100
    want, kept = authors_loss((h @ w.t()).reshape(n, vocab), y.reshape(n), key, upcast=torch.float64)
    got = fused_linear_sft_loss(h, w, y, objective=key, chunk_size=7)
    tol = denominator_tol(kept)
    assert got.item() == pytest.approx(want.item(), rel=tol, abs=1e-15)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        assert torch.allclose(a, b, rtol=tol, atol=1e-14)


def test_empty_selection_is_zero_like_the_authors():
    logits, labels = make(dtype=torch.float32)
    logits = logits.requires_grad_(True)
    want, kept = authors_loss(logits, labels, "OnlyTopP-0.999999")
    assert kept == 0 and want.item() == 0.0
    with pytest.warns(RuntimeWarning, match="no token is kept"):
        got = sft_loss(logits, labels, objective="OnlyTopP-0.999999")
    assert got.item() == 0.0
    assert torch.all(torch.autograd.grad(got, logits)[0] == 0)


@pytest.mark.parametrize("key,name,kw", [("original", "nll", {}), ("logp", "nll", {}), ("p", "neg_p", {}),
                                         ("GeneralFamily-0.5", "f_alpha", {"alpha": 0.5}),
                                         ("OnlyTopLogP-0.2", "threshold", {"tau": 0.2})])
def test_keys_equal_lowbit_names(key, name, kw):
    logits, labels = make(dtype=torch.float32, seed=3)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    la, lb = sft_loss(a, labels, objective=key), sft_loss(b, labels, objective=name, **kw)
    assert la.item() == lb.item()
    assert torch.equal(torch.autograd.grad(la, a)[0], torch.autograd.grad(lb, b)[0])


def test_thresholds_select_by_probability_not_by_rank():
    # Three tokens with p = 0.5, 0.25, 0.05 (vocab 4 logits fix p exactly).
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.35, 0.3, 0.3]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 0, 0])
    z = probs.log()
    assert sft_loss(z, labels, objective="OnlyTopP-0.2").item() == pytest.approx((0.5 + 0.75) / 2, rel=1e-12)
    assert sft_loss(z, labels, objective="OnlyBottomP-0.25").item() == pytest.approx((0.75 + 0.95) / 2, rel=1e-12)
    assert sft_loss(z, labels, objective="OnlyTopLogP-0.3").item() == pytest.approx(math.log(2), rel=1e-12)
    assert sft_loss(z, labels, objective="OnlyBottomLogP-0.1").item() == pytest.approx(-math.log(0.05), rel=1e-12)


@pytest.mark.parametrize("bad,match", [
    ("OnlyTopP-1", r"q must lie in \[0, 1\)"), ("OnlyTopLogP-1.5", r"\[0, 1\)"), ("OnlyTopP--0.1", r"\[0, 1\)"),
    ("OnlyBottomP-0", r"\(0, 1\]"), ("OnlyBottomLogP-2", r"\(0, 1\]"), ("GeneralFamily-0", "alpha must be > 0"),
    ("GeneralFamily-nan", "finite"), ("OnlyTopP-x", "expected a number"), ("OnlyTopP", "unknown objective"),
    ("GeneralFamily", "unknown objective"), ("onlytopp-0.1", "unknown objective"),
])
def test_bad_keys(bad, match):
    logits, labels = make(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        sft_loss(logits, labels, objective=bad)
    assert not is_objective(bad)


def test_keys_take_no_keyword_hyper_parameters():
    logits, labels = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="alpha is only used.*carries alpha in its name"):
        sft_loss(logits, labels, objective="GeneralFamily-2", alpha=2.0)
    with pytest.raises(ValueError, match="tau is only used"):
        sft_loss(logits, labels, objective="OnlyTopLogP-0.2", tau=0.2)
    with pytest.raises(ValueError, match="fraction is only used"):
        fused_linear_sft_loss(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long),
                              objective="OnlyTopP-0.2", fraction=0.2)


def test_is_objective_and_the_documented_table():
    for name in OBJECTIVES + ("original", "logp", "p", "GeneralFamily-10", "OnlyTopP-0", "OnlyBottomLogP-1"):
        assert is_objective(name), name
    for name in ("auto", "top_p", "bottom_p", "", None, 3):
        assert not is_objective(name)
    # Every name and key appears in the module docstring that the README table is written from.
    doc = family.__doc__
    for name in OBJECTIVES + PAPER_KEYS:
        assert f"``{name}``" in doc, name
    spec = parse_objective("GeneralFamily-1e-3")
    assert (spec.loss, spec.alpha, spec.keep) == ("power", 1e-3, "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_objective("OnlyBottomP-0.5").q == 0.5
