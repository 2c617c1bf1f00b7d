"""sequence_logps, f-DPO and KLDO: closed forms, invariances, a known-KL recovery, gradients, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.objectives import (DIVERGENCES, KLDORunningMean, dpo_loss, fused_linear_sequence_logps, kldo_loss,
                               sequence_logps)


def logps(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Sequence log-probs of a few tens of tokens; the policy is near the reference.
    ref_c, ref_r = -40 - 10 * torch.rand(n, generator=g), -40 - 10 * torch.rand(n, generator=g)
    pol_c = ref_c + torch.randn(n, generator=g) * 2
    pol_r = ref_r + torch.randn(n, generator=g) * 2
    return [t.to(dtype) for t in (pol_c, pol_r, ref_c, ref_r)]


def test_sequence_logps_matches_per_token_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[:, :2] = -100
    labels[2, 5:] = -100
    got = sequence_logps(logits, labels)
    want = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(7):
            if labels[b, t] != -100:
                row = logits[b, t]
                want[b] += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def standard_dpo(pc, pr, rc, rr, beta):
    """Rafailov et al. eq. 7, written directly."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def test_reverse_kl_is_standard_dpo():
    pc, pr, rc, rr = logps()
    for beta in (0.05, 0.1, 0.5):
        loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, divergence="reverse_kl")
        assert loss.item() == pytest.approx(standard_dpo(pc, pr, rc, rr, beta).item(), rel=1e-12)
        assert torch.allclose(m["chosen_rewards"], beta * (pc - rc))
        assert torch.allclose(m["rejected_rewards"], beta * (pr - rr))
        assert m["accuracy"].item() == pytest.approx(((pc - rc) > (pr - rr)).double().mean().item())
        assert m["margin"].item() == pytest.approx((beta * ((pc - rc) - (pr - rr))).mean().item(), rel=1e-12)


GENERATORS = {
    # f-divergence generators f(u), u = pi / pi_ref, from the f-DPO paper's table.
    "reverse_kl": lambda u, a: u * math.log(u),
    "forward_kl": lambda u, a: -math.log(u),
    "js": lambda u, a: u * math.log(u) - (u + 1) * math.log((u + 1) / 2),
    "alpha": lambda u, a: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_f_dpo_matches_numerical_derivative_of_generator(divergence):
    # The loss is -log sigmoid(beta (f'(u_w) - f'(u_l))); f' here by central differences of f itself.
    pc, pr, rc, rr = logps(n=6, seed=1)
    a = 0.3 if divergence == "alpha" else None
    beta = 0.2

    def fprime(u):
        h = 1e-6 * u
        return (GENERATORS[divergence](u + h, a) - GENERATORS[divergence](u - h, a)) / (2 * h)

    want = []
    for i in range(6):
        uw, ul = math.exp(pc[i] - rc[i]), math.exp(pr[i] - rr[i])
        want.append(-F.logsigmoid(torch.tensor(beta * (fprime(uw) - fprime(ul)), dtype=torch.float64)).item())
    kw = {"alpha": a} if a is not None else {}
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, divergence=divergence, reduction="none", **kw)
    assert torch.allclose(loss, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_alpha_one_is_forward_kl():
    pc, pr, rc, rr = logps()
    a, _ = dpo_loss(pc, pr, rc, rr, divergence="alpha", alpha=1.0)
    b, _ = dpo_loss(pc, pr, rc, rr, divergence="forward_kl")
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_invariant_to_constant_shift_of_all_logps(divergence):
    pc, pr, rc, rr = logps(seed=2)
    kw = {"alpha": 0.5} if divergence == "alpha" else {}
    base, m0 = dpo_loss(pc, pr, rc, rr, divergence=divergence, label_smoothing=0.1, **kw)
    for c in (-7.5, 3.0, 100.0):
        shifted, m1 = dpo_loss(pc + c, pr + c, rc + c, rr + c, divergence=divergence, label_smoothing=0.1, **kw)
        assert shifted.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-12)
        assert m1["accuracy"] == m0["accuracy"]


def test_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = logps(seed=3)
    eps, beta = 0.2, 0.1
    h = beta * ((pc - rc) - (pr - rr))
    want = (-(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)).mean()
    got, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dpo_gradcheck(divergence):
    pc, pr, rc, rr = logps(n=5, seed=4)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    kw = {"alpha": 0.4} if divergence == "alpha" else {}
    assert torch.autograd.gradcheck(
        lambda a, b: dpo_loss(a, b, rc, rr, divergence=divergence, label_smoothing=0.1, **kw)[0], (pc, pr))


def test_dpo_through_fused_sequence_logps():
    g = torch.Generator().manual_seed(5)
    hidden, vocab, t = 16, 101, 9
    w = (torch.randn(vocab, hidden, generator=g) / 4).requires_grad_(True)
    h = torch.randn(4, t, hidden, generator=g, requires_grad=True)  # rows 0-1 chosen, 2-3 rejected
    y = torch.randint(0, vocab, (4, t), generator=g)
    y[:, :3] = -100
    ref_lp = torch.randn(4, dtype=torch.float32) - 30

    def loss_of(lp):
        return dpo_loss(lp[:2], lp[2:], ref_lp[:2], ref_lp[2:], divergence="js")[0]

    a = loss_of(fused_linear_sequence_logps(h, w, y, chunk_size=5))
    ga = torch.autograd.grad(a, (h, w))
    b = loss_of(sequence_logps(h @ w.t(), y))
    gb = torch.autograd.grad(b, (h, w))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    for x, z in zip(ga, gb):
        assert ((x - z).norm() / z.norm()).item() <= 1e-6


def test_dpo_bad_inputs():
    pc, pr, rc, rr = logps()
    with pytest.raises(ValueError, match="policy_rejected_logps shape"):
        dpo_loss(pc, pr[:-1], rc, rr)
    with pytest.raises(ValueError, match="unknown divergence 'tv'") as e:
        dpo_loss(pc, pr, rc, rr, divergence="tv")
    assert all(d in str(e.value) for d in DIVERGENCES)
    for alpha in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            dpo_loss(pc, pr, rc, rr, divergence="alpha", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        dpo_loss(pc, pr, rc, rr, divergence="alpha")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.7)
    with pytest.raises(TypeError, match="ref_chosen_logps"):
        dpo_loss(pc, pr, [1.0], rr)


# -------------------------------------------------------------------------------------------------- KLDO
def gaussian_kl(m1, s1, m2, s2):
    return math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def test_kldo_recovers_kl_between_two_gaussians():
    # P = N(0, 1) plays the aligned distribution, Q = N(1, 1.5^2) the unaligned one. A quadratic critic
    # r(x) = a x^2 + b x + c contains the true log-density ratio, so maximising the DV bound -L over it
    # recovers KL(P || Q); the fit and the evaluation use independent samples.
    m1, s1, m2, s2 = 0.0, 1.0, 1.0, 1.5
    true_kl = gaussian_kl(m1, s1, m2, s2)
    g = torch.Generator().manual_seed(0)
    n = 100_000
    fit_p, fit_q = torch.randn(n, generator=g, dtype=torch.float64) * s1 + m1, torch.randn(n, generator=g, dtype=torch.float64) * s2 + m2
    ev_p, ev_q = torch.randn(n, generator=g, dtype=torch.float64) * s1 + m1, torch.randn(n, generator=g, dtype=torch.float64) * s2 + m2
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def critic(x):
        return theta[0] * x ** 2 + theta[1] * x + theta[2]

    def loss_on(xp, xq):
        zero_p, zero_q = torch.zeros_like(xp), torch.zeros_like(xq)
        # beta = 1 and a zero reference make the reward r(x) equal to the critic itself.
        return kldo_loss(critic(xp), critic(xq), zero_p, zero_q, beta=1.0)

    opt = torch.optim.LBFGS([theta], max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_on(fit_p, fit_q)[0]
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss, metrics = loss_on(ev_p, ev_q)
    estimate = metrics["kl_estimate"].item()
    assert estimate == pytest.approx(-loss.item())
    assert abs(estimate - true_kl) <= 0.05 * true_kl, (estimate, true_kl)
    # The fitted critic matches the true log ratio's x^2 and x coefficients.
    a_true = -1 / (2 * s1 ** 2) + 1 / (2 * s2 ** 2)
    b_true = m1 / s1 ** 2 - m2 / s2 ** 2
    assert theta[0].item() == pytest.approx(a_true, rel=0.1) and theta[1].item() == pytest.approx(b_true, rel=0.1)


def test_kldo_value_and_closed_form_gradient():
    g = torch.Generator().manual_seed(7)
    pa, pu = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    ra, ru = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    beta = 0.3
    pa.requires_grad_(True)
    pu.requires_grad_(True)
    loss, m = kldo_loss(pa, pu, ra, ru, beta=beta)
    rp, rn = beta * (pa - ra), beta * (pu - ru)
    want = -rp.mean() + torch.log(torch.exp(rn).mean())
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    ga, gu = torch.autograd.grad(loss, (pa, pu))
    assert torch.allclose(ga, torch.full_like(ga, -beta / 5))
    soft = torch.softmax(rn.detach(), 0)
    assert torch.allclose(gu, beta * soft)
    assert m["accuracy"].item() == pytest.approx((rp[:, None] > rn[None, :]).double().mean().item())
    assert torch.autograd.gradcheck(lambda a, b: kldo_loss(a, b, ra, ru, beta=beta)[0], (pa, pu))


def test_kldo_moving_average_gradient():
    g = torch.Generator().manual_seed(8)
    ra, ru = torch.zeros(4, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    pa = torch.randn(4, generator=g, dtype=torch.float64)
    batches = [torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    state = KLDORunningMean(rate=0.25)
    avg = None
    for i, pu in enumerate(batches):
        loss, _ = kldo_loss(pa, pu, ra, ru, beta=1.0, running_mean=state)
        plain, _ = kldo_loss(pa, pu, ra, ru, beta=1.0)
        assert loss.item() == pytest.approx(plain.item(), rel=1e-12)  # the value is the batch estimate
        batch_mean = torch.exp(pu.detach()).mean()
        avg = batch_mean if avg is None else 0.75 * avg + 0.25 * batch_mean
        (gu,) = torch.autograd.grad(loss, pu)
        assert torch.allclose(gu, torch.exp(pu.detach()) / (6 * avg))
        (gp,) = torch.autograd.grad(plain, pu)
        assert torch.allclose(gp, torch.softmax(pu.detach(), 0)) and (i == 0) == torch.allclose(gu, gp)


def test_kldo_empty_side_and_bad_inputs():
    x = torch.randn(3)
    loss, _ = kldo_loss(x, x[:0], x, x[:0])
    assert loss.item() == pytest.approx(-0.1 * 0.0)
    with pytest.raises(ValueError, match="ref_aligned_logps shape"):
        kldo_loss(x, x, x[:2], x)
    with pytest.raises(ValueError, match="1-D"):
        kldo_loss(x[None], x, x[None], x)
    with pytest.raises(ValueError, match="beta"):
        kldo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(TypeError, match="running_mean"):
        kldo_loss(x, x, x, x, running_mean=0.5)
