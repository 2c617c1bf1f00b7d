"""sft_loss against an independent fp64 implementation, closed-form gradients, limits, masking, errors.

The authors' keys ("OnlyTopP-0.1", ...) are checked against a transcription of their trainer in
test_paper_keys.py."""
import math
import warnings

import numpy as np
import pytest
import torch

from lowbit.objectives import OBJECTIVES, auto_objective, is_objective, prior_strength, sft_loss

CASES = [
    ("nll", {}),
    ("neg_p", {}),
    ("f_alpha", {"alpha": 0.5}),
    ("f_alpha", {"alpha": 10.0}),
    ("threshold", {}),
    ("threshold", {"tau": 0.05}),
    ("top_fraction", {"fraction": 0.3}),
    ("bottom_fraction", {"fraction": 0.25}),
]
IDS = [f"{o}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for o, kw in CASES]


def make(n_tok=40, vocab=11, scale=3.0, seed=0, masked=8, dtype=torch.float64, confident=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_tok, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n_tok,), generator=g)
    if confident:  # half the targets are the argmax, so thresholds keep some tokens
        labels[1::2] = logits[1::2].argmax(-1)
    labels[:masked] = -100
    return logits, labels


def naive_mean(logits, labels, objective, alpha=None, tau=None, fraction=None):
    """Independent fp64 spec written from the paper's formulas with numpy (no shared code)."""
    z = logits.detach().double().numpy()
    y = labels.numpy()
    idx = np.nonzero(y != -100)[0]
    zz = z[idx] - z[idx].max(1, keepdims=True)
    prob = np.exp(zz) / np.exp(zz).sum(1, keepdims=True)
    pt = prob[np.arange(len(idx)), y[idx]]
    keep = np.ones(len(idx), bool)
    if objective == "nll":
        loss = -np.log(pt)
    elif objective == "neg_p":
        loss = 1.0 - pt
    elif objective == "f_alpha":
        loss = (1.0 - pt ** alpha) / alpha
    elif objective == "threshold":
        loss = -np.log(pt)
        keep = pt >= (0.2 if tau is None else tau)
    else:
        loss = -np.log(pt)
        k = math.ceil(fraction * len(idx))
        order = np.argsort(-pt if objective == "top_fraction" else pt, kind="stable")
        keep = np.zeros(len(idx), bool)
        keep[order[:k]] = True
    return loss[keep].sum() / keep.sum(), int(keep.sum())


@pytest.mark.parametrize("objective,kw", CASES, ids=IDS)
def test_value_matches_independent_fp64(objective, kw):
    logits, labels = make()
    want, _ = naive_mean(logits, labels, objective, **kw)
    got = sft_loss(logits, labels, objective=objective, **kw)
    assert got.dtype == torch.float64
    assert abs(got.item() - want) <= 1e-12 * max(1.0, abs(want))
    got32 = sft_loss(logits.float(), labels, objective=objective, **kw)
    assert got32.dtype == torch.float32
    assert abs(got32.item() - want) <= 2e-6 * max(1.0, abs(want))


@pytest.mark.parametrize("objective,kw", CASES, ids=IDS)
def test_gradcheck_fp64(objective, kw):
    logits, labels = make(n_tok=8, vocab=5, masked=2)
    logits.requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda z: sft_loss(z, labels, objective=objective, reduction=reduction, **kw), (logits,), fast_mode=True)


def closed_form_grad(logits, labels, objective, alpha=None):
    """d loss_sum / d z = w(p) * (softmax - onehot) with w = 1 (nll), p (-p), p^alpha (f_alpha)."""
    z = logits.detach().double()
    valid = labels != -100
    s = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), z.shape[-1]).double()
    pt = (s * onehot).sum(-1, keepdim=True)
    w = {"nll": torch.ones_like(pt), "neg_p": pt, "f_alpha": pt ** (alpha or 1.0)}[objective]
    return torch.where(valid[:, None], w * (s - onehot), torch.zeros_like(s))


@pytest.mark.parametrize("objective,alpha", [("nll", None), ("neg_p", None), ("f_alpha", 0.3), ("f_alpha", 4.0)])
def test_closed_form_gradient_fp32_small_probabilities(objective, alpha):
    # A wide logit spread gives target probabilities down to ~1e-20: the gradient must stay accurate there.
    logits, labels = make(n_tok=64, vocab=50, scale=8.0, seed=1, dtype=torch.float32, confident=False)
    logits.requires_grad_(True)
    kw = {"alpha": alpha} if alpha is not None else {}
    (g,) = torch.autograd.grad(sft_loss(logits, labels, objective=objective, reduction="sum", **kw), logits)
    want = closed_form_grad(logits, labels, objective, alpha)
    assert want.abs().max() > 0
    valid = labels != -100
    pt = torch.softmax(logits.detach().double(), -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    assert pt[valid].min() < 1e-6  # the case that exposes cancellation
    # Per-token relative error, so tokens with tiny gradients are checked as strictly as large ones.
    err = (g.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)
    # Below ~1e-30 the exact gradient itself is (sub)normal-range in fp32; p^alpha may underflow there.
    representable = valid & (want.norm(dim=1) > 1e-30)
    assert representable.sum() >= 20
    assert err[representable].max() < 1e-4
    assert torch.all(g[~valid] == 0)


def test_f_alpha_limits():
    logits, labels = make(dtype=torch.float32, scale=2.0)
    logits.requires_grad_(True)
    nll = sft_loss(logits, labels, objective="nll")
    small = sft_loss(logits, labels, objective="f_alpha", alpha=1e-7)
    assert abs(small.item() - nll.item()) <= 1e-6 * abs(nll.item())
    g_nll, = torch.autograd.grad(nll, logits)
    g_small, = torch.autograd.grad(small, logits)
    assert torch.allclose(g_small, g_nll, rtol=1e-6, atol=1e-9)
    one = sft_loss(logits, labels, objective="f_alpha", alpha=1.0)
    negp = sft_loss(logits, labels, objective="neg_p")
    assert one.item() == negp.item()
    assert torch.equal(torch.autograd.grad(one, logits)[0], torch.autograd.grad(negp, logits)[0])


def test_f_alpha_monotone_family_between_limits():
    # (1 - p^a) / a decreases in a for fixed p in (0, 1): nll > f_0.5 > neg_p > f_2.
    logits, labels = make(dtype=torch.float64)
    vals = [sft_loss(logits, labels, objective="nll").item()]
    vals += [sft_loss(logits, labels, objective="f_alpha", alpha=a).item() for a in (0.5, 1.0, 2.0)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("objective,kw", CASES, ids=IDS)
def test_prompt_tokens_contribute_nothing(objective, kw):
    logits, labels = make()
    masked = labels == -100
    base = sft_loss(logits, labels, objective=objective, **kw)
    other = logits.clone()
    other[masked] = torch.randn_like(other[masked]) * 50
    other.requires_grad_(True)
    loss = sft_loss(other, labels, objective=objective, **kw)
    assert loss.item() == pytest.approx(base.item(), rel=1e-12)
    (g,) = torch.autograd.grad(loss, other)
    assert torch.all(g[masked] == 0)


@pytest.mark.parametrize("objective,kw", CASES, ids=IDS)
def test_all_masked_gives_zero_with_warning(objective, kw):
    logits = torch.randn(2, 5, 9, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for reduction in ("mean", "sum"):
        with pytest.warns(RuntimeWarning, match="no token is kept"):
            loss = sft_loss(logits, labels, objective=objective, reduction=reduction, **kw)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.all(g == 0)


def test_threshold_keeps_only_confident_tokens_and_averages_over_them():
    # Two tokens with p = 0.5 and 0.1 (vocab 2 -> logits fix p exactly); tau = 0.2 keeps the first only.
    probs = torch.tensor([[0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    loss = sft_loss(probs.log(), labels, objective="threshold", tau=0.2)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)
    with pytest.warns(RuntimeWarning):
        assert sft_loss(probs.log(), labels, objective="threshold", tau=0.6).item() == 0.0


@pytest.mark.parametrize("objective", ["top_fraction", "bottom_fraction"])
def test_top_bottom_keep_fraction(objective):
    logits, labels = make(n_tok=103, masked=3, seed=4)
    per = sft_loss(logits, labels, objective=objective, fraction=0.1, reduction="none")
    _, kept = naive_mean(logits, labels, objective, fraction=0.1)
    assert kept == math.ceil(0.1 * 100) == int((per != 0).sum())
    nll = sft_loss(logits, labels, objective="nll", reduction="none")
    kept_nll = nll[per != 0]
    rest = nll[(per == 0) & (labels != -100)]
    # -log p is decreasing in p: top_fraction keeps the lowest losses, bottom_fraction the highest.
    if objective == "top_fraction":
        assert kept_nll.max() <= rest.min()
    else:
        assert kept_nll.min() >= rest.max()


def test_reductions_and_batch_shapes():
    logits, labels = make(n_tok=24)
    per = sft_loss(logits.view(4, 6, -1), labels.view(4, 6), objective="neg_p", reduction="none")
    assert per.shape == (4, 6)
    total = sft_loss(logits, labels, objective="neg_p", reduction="sum")
    mean = sft_loss(logits, labels, objective="neg_p")
    assert per.sum().item() == pytest.approx(total.item(), rel=1e-12)
    assert mean.item() == pytest.approx(total.item() / int((labels != -100).sum()), rel=1e-12)


def test_bf16_logits_use_fp32_log_softmax():
    logits, labels = make(dtype=torch.bfloat16)
    got = sft_loss(logits, labels)
    assert got.dtype == torch.float32
    want, _ = naive_mean(logits.float(), labels, "nll")
    assert got.item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs():
    logits, labels = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="labels shape"):
        sft_loss(logits, labels[:-1])
    with pytest.raises(ValueError, match="labels must lie in"):
        bad = labels.clone(); bad[-1] = logits.shape[-1]
        sft_loss(logits, bad)
    with pytest.raises(ValueError, match="labels must lie in"):
        bad = labels.clone(); bad[-1] = -3
        sft_loss(logits, bad)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        sft_loss(logits, labels.float())
    with pytest.raises(TypeError, match="logits"):
        sft_loss(logits.numpy(), labels)
    with pytest.raises(ValueError, match="unknown objective 'kl'") as e:
        sft_loss(logits, labels, objective="kl")
    assert all(name in str(e.value) for name in OBJECTIVES)
    for alpha in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            sft_loss(logits, labels, objective="f_alpha", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        sft_loss(logits, labels, objective="f_alpha")
    for tau in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="tau"):
            sft_loss(logits, labels, objective="threshold", tau=tau)
    for fraction in (0.0, 1.2, None):
        with pytest.raises(ValueError, match="fraction"):
            sft_loss(logits, labels, objective="top_fraction", fraction=fraction)
    with pytest.raises(ValueError, match="fraction is only used"):
        sft_loss(logits, labels, objective="threshold", fraction=0.5)
    with pytest.raises(ValueError, match="alpha is only used"):
        sft_loss(logits, labels, objective="nll", alpha=0.5)
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(logits, labels, reduction="avg")


@pytest.mark.parametrize("old,new,kind", [("top_p", "top_fraction", "Top"), ("bottom_p", "bottom_fraction", "Bottom")])
def test_old_fraction_names_raise_with_the_replacements(old, new, kind):
    logits, labels = make(dtype=torch.float32)
    with pytest.raises(ValueError) as e:
        sft_loss(logits, labels, objective=old, p=0.3)
    msg = str(e.value)
    assert f"objective={old!r}" in msg and repr(new) in msg and "fraction=" in msg
    assert f"Only{kind}LogP-<q>" in msg and f"Only{kind}P-<q>" in msg


def test_p_is_the_former_name_of_fraction():
    logits, labels = make()
    a = sft_loss(logits, labels, objective="bottom_fraction", fraction=0.4)
    b = sft_loss(logits, labels, objective="bottom_fraction", p=0.4)
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="not both"):
        sft_loss(logits, labels, objective="bottom_fraction", fraction=0.4, p=0.4)
    with pytest.raises(ValueError, match="p is only accepted"):
        sft_loss(logits, labels, objective="nll", p=0.4)


# ------------------------------------------------------------------------------------------- prior strength
class FixedProbModel(torch.nn.Module):
    """Predicts token 0 with probability ``p0`` at every position (uniform over the rest)."""

    def __init__(self, p0, vocab=5):
        super().__init__()
        rest = (1 - p0) / (vocab - 1)
        self.register_buffer("row", torch.log(torch.tensor([p0] + [rest] * (vocab - 1))))
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return self.row.expand(*input_ids.shape, -1) + self.dummy


# The intermediate case lands at a mean of 0.3292 (see `want`): alpha = (0.3292 - 0.2) / (0.5 - 0.2) = 0.43.
@pytest.mark.parametrize("p0,regime,objective", [(0.8, "strong", "neg_p"), (0.05, "weak", "nll"),
                                                 (0.35, "intermediate", "GeneralFamily-0.43")])
def test_prior_strength(p0, regime, objective):
    ids = torch.zeros(3, 6, dtype=torch.long)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[0, 4] = 2      # one target the model gives (1 - p0) / 4
    batches = [{"input_ids": ids, "labels": labels}, (ids, labels)]
    res = prior_strength(FixedProbModel(p0), batches)
    n = 2 * 3 * 3  # positions 3..5 predicted from 2..4 after the shift, 3 rows, 2 batches
    want = ((n - 2) * p0 + 2 * (1 - p0) / 4) / n
    assert res.num_tokens == n
    assert res.mean_prob == pytest.approx(want, rel=1e-6)
    assert (res.regime, res.recommended_objective) == (regime, objective)
    assert objective in str(res)


@pytest.mark.parametrize("mean,objective,regime", [
    (0.97, "neg_p", "model-strong"), (0.5, "neg_p", "model-strong"), (0.2, "nll", "model-weak"),
    (0.0, "nll", "model-weak"), (0.35, "GeneralFamily-0.5", "model-intermediate"),
    (0.2001, "GeneralFamily-0.01", "model-intermediate"), (0.497, "GeneralFamily-0.99", "model-intermediate"),
])
def test_auto_objective_rule(mean, objective, regime):
    key, reason = auto_objective(mean)
    assert key == objective and regime in reason
    assert ("strong=0.5" in reason) or ("weak=0.2" in reason)  # the reason states the cut-point it used
    assert is_objective(key)
    logits, labels = make()
    sft_loss(logits, labels, objective=key)  # a complete objective value: no alpha to pass


def test_auto_objective_interpolates_alpha_between_custom_cut_points():
    alphas = []
    for mean in (0.15, 0.3, 0.5, 0.7, 0.85):
        key, _ = auto_objective(mean, strong=0.9, weak=0.1)
        alphas.append(float(key.split("-", 1)[1]))
    assert alphas == [0.06, 0.25, 0.5, 0.75, 0.94]
    with pytest.raises(ValueError, match="weak <= strong"):
        auto_objective(0.5, strong=0.2, weak=0.4)
    with pytest.raises(ValueError, match="mean_prob"):
        auto_objective(1.5)
    with pytest.raises(TypeError, match="mean_prob"):
        auto_objective(torch.tensor(0.5))
