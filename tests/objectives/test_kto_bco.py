"""KTO and BCO against their published formulas, written out here per example with math.*."""
import math

import pytest
import torch

from lowbit.objectives import BCORunningMean, bco_loss, kto_kl_completions, kto_loss


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def sides(n_pos=5, n_neg=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_a, ref_u = -30 - 5 * torch.rand(n_pos, generator=g, dtype=torch.float64), \
        -30 - 5 * torch.rand(n_neg, generator=g, dtype=torch.float64)
    pol_a = (ref_a + 3 * torch.randn(n_pos, generator=g, dtype=torch.float64)).requires_grad_(True)
    pol_u = (ref_u + 3 * torch.randn(n_neg, generator=g, dtype=torch.float64)).requires_grad_(True)
    return pol_a, pol_u, ref_a, ref_u


# --------------------------------------------------------------------------------------------------- KTO
def kto_reference(pol_a, pol_u, ref_a, ref_u, beta, z0, lam_d=1.0, lam_u=1.0):
    """KTO paper eqn 7: L = E[lambda_y - v(x, y)], v = lambda_D sigma(beta (r - z0)) for desirable y and
    lambda_U sigma(beta (z0 - r)) for undesirable y, r = log pi / pi_ref; the expectation is the batch mean.
    Returns the loss and its gradient w.r.t. the policy log-probs (d sigma(u) = sigma(u)(1 - sigma(u)))."""
    terms, g_a, g_u = [], [], []
    n = len(pol_a) + len(pol_u)
    for p, r in zip(pol_a.tolist(), ref_a.tolist()):
        s = sigmoid(beta * ((p - r) - z0))
        terms.append(lam_d - lam_d * s)
        g_a.append(-lam_d * beta * s * (1 - s) / n)
    for p, r in zip(pol_u.tolist(), ref_u.tolist()):
        s = sigmoid(beta * (z0 - (p - r)))
        terms.append(lam_u - lam_u * s)
        g_u.append(lam_u * beta * s * (1 - s) / n)
    return sum(terms) / n, torch.tensor(g_a, dtype=torch.float64), torch.tensor(g_u, dtype=torch.float64)


@pytest.mark.parametrize("beta,kl,lam_d,lam_u", [(0.1, 0.0, 1.0, 1.0), (0.5, 1.3, 1.0, 1.0), (0.2, 0.7, 2.0, 0.5)])
def test_kto_value_and_gradient(beta, kl, lam_d, lam_u):
    pa, pu, ra, ru = sides()
    loss, m = kto_loss(pa, pu, ra, ru, beta=beta, kl=kl, desirable_weight=lam_d, undesirable_weight=lam_u)
    want, ga, gu = kto_reference(pa, pu, ra, ru, beta, kl, lam_d, lam_u)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    got_a, got_u = torch.autograd.grad(loss, (pa, pu))
    assert torch.allclose(got_a, ga, rtol=1e-10, atol=1e-15) and torch.allclose(got_u, gu, rtol=1e-10, atol=1e-15)
    assert m["kl"].item() == kl
    assert m["aligned_reward"].item() == pytest.approx((beta * (pa - ra)).mean().item(), rel=1e-12)
    assert m["margin"].item() == pytest.approx(m["aligned_reward"].item() - m["unaligned_reward"].item())


def test_kto_kl_from_mismatched_pairs_is_trls_clamped_detached_mean():
    pa, pu, ra, ru = sides(seed=1)
    g = torch.Generator().manual_seed(9)
    kl_ref = -40 + torch.randn(12, generator=g, dtype=torch.float64)
    for shift, z0 in ((0.8, None), (-0.8, 0.0)):  # a negative mean log-ratio is clamped to 0
        kl_pol = (kl_ref + shift + 0.1 * torch.randn(12, generator=g, dtype=torch.float64)).requires_grad_(True)
        loss, m = kto_loss(pa, pu, ra, ru, beta=0.3, policy_kl_logps=kl_pol, ref_kl_logps=kl_ref)
        z = max(0.0, sum((kl_pol - kl_ref).tolist()) / 12) if z0 is None else z0
        assert m["kl"].item() == pytest.approx(z, rel=1e-12, abs=0.0)
        want, _, _ = kto_reference(pa, pu, ra, ru, 0.3, z)
        assert loss.item() == pytest.approx(want, rel=1e-12)
        # z0 is a constant: no gradient reaches the KL pairs.
        assert torch.autograd.grad(loss, kl_pol, allow_unused=True)[0] is None


def test_kto_given_kl_is_detached_and_clamped():
    pa, pu, ra, ru = sides(seed=2)
    kl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    loss, m = kto_loss(pa, pu, ra, ru, kl=kl)
    assert torch.autograd.grad(loss, kl, allow_unused=True)[0] is None
    neg, m = kto_loss(pa, pu, ra, ru, kl=-2.0)
    zero, _ = kto_loss(pa, pu, ra, ru, kl=0.0)
    assert m["kl"].item() == 0.0 and neg.item() == zero.item()


def test_kto_empty_sides():
    pa, pu, ra, ru = sides(seed=3)
    only_u, m = kto_loss(pa[:0], pu, ra[:0], ru, beta=0.2, kl=0.5)
    want, _, gu = kto_reference(pa[:0], pu, ra[:0], ru, 0.2, 0.5)
    assert only_u.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(torch.autograd.grad(only_u, pu)[0], gu)
    assert math.isnan(m["aligned_reward"].item()) and math.isnan(m["margin"].item())
    none, _ = kto_loss(pa[:0], pu[:0], ra[:0], ru[:0], kl=0.0)
    assert none.item() == 0.0
    assert torch.all(torch.autograd.grad(none, pu)[0] == 0)


def test_kto_bad_inputs():
    pa, pu, ra, ru = sides()
    with pytest.raises(ValueError, match="kl=.*policy_kl_logps"):
        kto_loss(pa, pu, ra, ru)
    with pytest.raises(ValueError, match="not both"):
        kto_loss(pa, pu, ra, ru, kl=0.1, policy_kl_logps=ra, ref_kl_logps=ra)
    with pytest.raises(ValueError, match="together"):
        kto_loss(pa, pu, ra, ru, policy_kl_logps=ra)
    with pytest.raises(ValueError, match="ref_kl_logps shape"):
        kto_loss(pa, pu, ra, ru, policy_kl_logps=ra, ref_kl_logps=ru)
    with pytest.raises(ValueError, match="ref_unaligned_logps shape"):
        kto_loss(pa, pu, ra, ru[:-1], kl=0.0)
    with pytest.raises(ValueError, match="policy_aligned_logps must be 1-D"):
        kto_loss(pa[None], pu, ra[None], ru, kl=0.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(pa, pu, ra, ru, kl=0.0, undesirable_weight=-1.0)
    with pytest.raises(TypeError, match="desirable_weight"):
        kto_loss(pa, pu, ra, ru, kl=0.0, desirable_weight="1")
    with pytest.raises(ValueError, match="kl must be finite"):
        kto_loss(pa, pu, ra, ru, kl=float("nan"))
    with pytest.raises(ValueError, match="beta"):
        kto_loss(pa, pu, ra, ru, kl=0.0, beta=0.0)


def test_kto_kl_completions_pairs_each_prompt_with_the_previous_completion():
    assert kto_kl_completions(["y1", "y2", "y3"]) == ["y3", "y1", "y2"]
    with pytest.raises(ValueError, match="completions"):
        kto_kl_completions(["y1"])


# --------------------------------------------------------------------------------------------------- BCO
def bco_reference(pol_a, pol_u, ref_a, ref_u, beta, delta, w_u=None):
    """BCO: -log sigma(r+ - delta) and -log sigma(-(r- - delta)), r = beta log pi / pi_ref, batch mean;
    delta is a constant, so d/dr of -log sigma(r - delta) = -(1 - sigma(r - delta))."""
    n = len(pol_a) + len(pol_u)
    w_u = [1.0] * len(pol_u) if w_u is None else w_u
    terms, g_a, g_u = [], [], []
    for p, r in zip(pol_a.tolist(), ref_a.tolist()):
        x = beta * (p - r) - delta
        terms.append(-math.log(sigmoid(x)))
        g_a.append(-beta * (1 - sigmoid(x)) / n)
    for p, r, w in zip(pol_u.tolist(), ref_u.tolist(), w_u):
        x = beta * (p - r) - delta
        terms.append(-w * math.log(sigmoid(-x)))
        g_u.append(w * beta * sigmoid(x) / n)
    return sum(terms) / n, torch.tensor(g_a, dtype=torch.float64), torch.tensor(g_u, dtype=torch.float64)


def test_bco_value_gradient_and_batch_delta():
    pa, pu, ra, ru = sides(seed=4)
    beta = 0.3
    loss, m = bco_loss(pa, pu, ra, ru, beta=beta)
    rewards = [beta * (p - r) for p, r in zip(pa.tolist() + pu.tolist(), ra.tolist() + ru.tolist())]
    delta = sum(rewards) / len(rewards)
    want, ga, gu = bco_reference(pa, pu, ra, ru, beta, delta)
    assert m["delta"].item() == pytest.approx(delta, rel=1e-12)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    got_a, got_u = torch.autograd.grad(loss, (pa, pu))
    assert torch.allclose(got_a, ga, rtol=1e-10) and torch.allclose(got_u, gu, rtol=1e-10)
    right = sum(r > delta for r in rewards[:5]) + sum(r < delta for r in rewards[5:])
    assert m["accuracy"].item() == pytest.approx(right / 12)


class TRLRunningMoments:
    """Transcription of the mean update of TRL's RunningMoments (single process)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_count = xs.numel()
        delta = xs_mean - self.mean
        tot = self.count + xs_count
        self.var = float((self.var * self.count + delta ** 2 * self.count * xs_count / tot + xs_var * xs_count) / tot)
        self.mean += float(delta * xs_count / tot)
        self.count = tot


def test_bco_running_mean_follows_trl_and_is_updated_before_use():
    g = torch.Generator().manual_seed(5)
    running, trl = BCORunningMean(), TRLRunningMoments()
    seen = []
    for step in range(4):
        n_pos, n_neg = 3 + step, 4
        pa, pu, ra, ru = sides(n_pos, n_neg, seed=10 + step)
        loss, m = bco_loss(pa, pu, ra, ru, beta=0.5, running_mean=running)
        batch = torch.cat([0.5 * (pa - ra), 0.5 * (pu - ru)]).detach()
        trl.update(batch)
        seen += batch.tolist()
        assert running.mean == pytest.approx(trl.mean, rel=1e-12)
        assert running.mean == pytest.approx(sum(seen) / len(seen), rel=1e-12)  # the mean of every reward so far
        assert m["delta"].item() == pytest.approx(running.mean, rel=1e-12)
        want, ga, gu = bco_reference(pa, pu, ra, ru, 0.5, running.mean)
        assert loss.item() == pytest.approx(want, rel=1e-12)
        assert torch.allclose(torch.autograd.grad(loss, pu)[0], gu, rtol=1e-10)
    before = running.state_dict()
    _, m = bco_loss(pa, pu, ra, ru, beta=0.5, running_mean=running, update=False)
    assert running.state_dict() == before and m["delta"].item() == pytest.approx(before["mean"], rel=1e-12)
    restored = BCORunningMean()
    restored.load_state_dict(before)
    assert restored.state_dict() == before
    running.reset()
    assert running.state_dict() == {"mean": 0.0, "count": 0}


def test_bco_unaligned_weights_and_empty_sides():
    pa, pu, ra, ru = sides(seed=6)
    w = torch.linspace(0.2, 3.0, 7, dtype=torch.float64)
    loss, m = bco_loss(pa, pu, ra, ru, beta=0.2, unaligned_weights=w)
    want, _, gu = bco_reference(pa, pu, ra, ru, 0.2, m["delta"].item(), w.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, pu)[0], gu, rtol=1e-10)
    only_a, m = bco_loss(pa, pu[:0], ra, ru[:0], beta=0.2)
    want, ga, _ = bco_reference(pa, pu[:0], ra, ru[:0], 0.2, m["delta"].item())
    assert only_a.item() == pytest.approx(want, rel=1e-12) and math.isnan(m["unaligned_reward"].item())
    none, m = bco_loss(pa[:0], pu[:0], ra[:0], ru[:0])
    assert none.item() == 0.0 and math.isnan(m["accuracy"].item())


def test_bco_bad_inputs():
    pa, pu, ra, ru = sides()
    with pytest.raises(TypeError, match="running_mean"):
        bco_loss(pa, pu, ra, ru, running_mean=0.5)
    with pytest.raises(ValueError, match="unaligned_weights shape"):
        bco_loss(pa, pu, ra, ru, unaligned_weights=torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="unaligned_weights"):
        bco_loss(pa, pu, ra, ru, unaligned_weights=[1.0] * 7)
    with pytest.raises(TypeError, match="update"):
        bco_loss(pa, pu, ra, ru, update=1)
    with pytest.raises(ValueError, match="ref_aligned_logps shape"):
        bco_loss(pa, pu, ra[:-1], ru)
    with pytest.raises(TypeError, match="policy_unaligned_logps"):
        bco_loss(pa, pu.tolist(), ra, ru)
