"""SPAM and CLASSP: float64 references written from the papers' update rules, plus targeted
checks of clipping, reset, warm-up and threshold masking."""
import math

import pytest
import torch

from lowbit.optim import CLASSP, SPAM

# ---------------------------------------------------------------------------------------------
# SPAM
# ---------------------------------------------------------------------------------------------
SPAM_HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, theta=5000.0,
               reset_interval=30, warmup_steps=10, clip_delay=5)


def spam_stream(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(1, steps + 1):
        x = torch.randn(200, generator=g, dtype=torch.float64)
        if t % 7 == 0:
            x[torch.randint(0, 200, (4,), generator=g)] *= 1000
        rows.append(x)
    return rows


def spam_reference(p0, rows, hp):
    lr, (b1, b2), eps, wd, th = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["theta"]
    R, W, D = hp["reset_interval"], hp["warmup_steps"], hp["clip_delay"]
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    clipped = 0
    for k, g in enumerate(rows, 1):  # every step has a gradient, so k = T
        if k % R == 0:
            m, v = torch.zeros_like(p), torch.zeros_like(p)
        since = k if k < R else k % R
        if k >= D and since >= D:
            spike = (g * g > th * v) & (v > 0)
            clipped += int(spike.sum())
            g = torch.where(spike, torch.sign(g) * torch.sqrt(th * v), g)
        w = 1.0 if k < R or k % R >= W else 1 - 0.99 * (1 + math.cos(math.pi * (k % R) / (W + 1))) / 2
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * w * math.sqrt(1 - b2 ** k) / (1 - b1 ** k) * m / (v.sqrt() + eps)
        p = p * (1 - lr * wd)
    return p, clipped


def test_spam_matches_reference_with_spikes_resets_and_warmup():
    rows = spam_stream(100)
    p0 = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = SPAM([p], **SPAM_HP)
    for g in rows:
        p.grad = g.clone()
        opt.step()
    ref, clipped = spam_reference(p0, rows, SPAM_HP)
    assert opt.stats["resets"] == 3 and opt.stats["clipped"] == clipped > 0
    assert (p.detach() - ref).abs().max().item() < 1e-10


def test_spam_clips_spike_to_sqrt_theta_v():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = SPAM([p], lr=1e-3, clip_delay=2, reset_interval=None)
    for _ in range(3):
        p.grad = torch.ones(10)
        opt.step()
    v_prev = opt.state[p]["exp_avg_sq"].clone()
    m_prev = opt.state[p]["exp_avg"].clone()
    g = torch.ones(10)
    g[3] = -1e4  # g^2 = 1e8 > 5000 v
    p.grad = g
    opt.step()
    bound = torch.sqrt(5000 * v_prev[3])
    assert opt.stats["clipped"] == 1
    assert torch.allclose(opt.state[p]["exp_avg"][3], 0.9 * m_prev[3] - 0.1 * bound, rtol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg"][0], 0.9 * m_prev[0] + 0.1, rtol=1e-6)


def test_spam_reset_zeroes_moments_and_warmup_restarts():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = SPAM([p], lr=1e-3, reset_interval=5, warmup_steps=3, clip_delay=100)
    for t in range(1, 6):
        p.grad = torch.full((10,), float(t))
        before = p.detach().clone()
        opt.step()
    # step 5 is a reset: m = (1 - beta1) g, v = (1 - beta2) g^2 from zero
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((10,), 0.1 * 5), rtol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg_sq"], torch.full((10,), 0.001 * 25), rtol=1e-6)
    # and its update is scaled by w(0) = 0.01
    k = 5
    expect = -1e-3 * 0.01 * math.sqrt(1 - 0.999 ** k) / (1 - 0.9 ** k) * 0.5 / (math.sqrt(0.025) + 1e-6)
    assert torch.allclose(p.detach() - before, torch.full((10,), expect), rtol=1e-5)
    w = [SPAM.warmup_factor(T, 5, 3) for T in range(1, 12)]
    assert w[:4] == [1.0] * 4 and w[4] == pytest.approx(0.01) and w[4] < w[5] < w[6] < 1.0 and w[7] == 1.0


def test_spam_does_not_freeze_entries_without_history():
    """An entry whose gradient is zero for the first steps is not clipped to zero later."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = SPAM([p], lr=1e-2, clip_delay=2, reset_interval=None)
    for t in range(10):
        p.grad = torch.tensor([1.0, 1.0, 0.0 if t < 5 else 1.0, 1.0])
        opt.step()
    assert p[2].item() < -1e-3 and opt.stats["clipped"] == 0


def test_spam_bad_arguments():
    q = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="^reset_interval:"):
        SPAM(q, reset_interval=0)
    with pytest.raises(ValueError, match="^warmup_steps:"):
        SPAM(q, warmup_steps=-1)
    with pytest.raises(ValueError, match="^lr:"):
        SPAM(q, lr=-1.0)
    with pytest.raises(ValueError, match=r"^betas\[1\]:"):
        SPAM(q, betas=(0.9, 1.0))


def test_spam_skips_nonfinite():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SPAM([p])
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.stats["nonfinite_skipped"] == 1
    assert "exp_avg" not in opt.state[p] or torch.isfinite(opt.state[p]["exp_avg"]).all()


# ---------------------------------------------------------------------------------------------
# CLASSP
# ---------------------------------------------------------------------------------------------
def classp_reference(w0, rows, lr, threshold, eps, power):
    w, acc = w0.clone(), torch.zeros_like(w0)
    for g in rows:
        upd = g * g > threshold
        acc = acc + torch.where(upd, g.abs() ** power, 0.0)
        w = w - torch.where(upd, lr * g / (eps + acc) ** (1 / power), 0.0)
    return w, acc


@pytest.mark.parametrize("power", [1.0, 1.5, 2.0])
def test_classp_matches_reference(power):
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(50)]
    w0 = torch.randn(64, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = CLASSP([w], lr=0.1, threshold=0.5, eps=1e-5, p=power)
    for g in rows:
        w.grad = g.clone()
        opt.step()
    ref_w, ref_acc = classp_reference(w0, rows, 0.1, 0.5, 1e-5, power)
    assert (w.detach() - ref_w).abs().max().item() < 1e-12
    assert (opt.state[w]["sum"] - ref_acc).abs().max().item() < 1e-12


def test_classp_updates_only_above_threshold():
    w = torch.nn.Parameter(torch.zeros(6))
    opt = CLASSP([w], lr=0.2, threshold=0.25, eps=1e-5, p=1.0)
    w.grad = torch.tensor([0.1, -0.5, 0.5, 0.6, -2.0, 0.0])  # g^2: .01 .25 .25 .36 4 0
    opt.step()
    moved = w.detach() != 0
    assert moved.tolist() == [False, False, False, True, True, False]
    assert opt.stats["updated"] == 2
    assert opt.state[w]["sum"].tolist() == pytest.approx([0, 0, 0, 0.6, 2.0, 0])
    # first update of an entry: lr * g / (eps + |g|) ~ lr * sign(g)
    assert w[3].item() == pytest.approx(-0.2 * 0.6 / (1e-5 + 0.6))


def test_classp_p2_threshold0_is_adagrad():
    """p = 2, threshold 0, eps 0 is AdaGrad (torch.optim.Adagrad with eps = 0); the two differ only
    in rounding (pow(., 1/2) vs sqrt, sub vs addcdiv): a few fp32 ulps of |w| < 4 per step."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(32, generator=gen) for _ in range(30)]
    a = torch.nn.Parameter(torch.zeros(32))
    b = torch.nn.Parameter(torch.zeros(32))
    oa = CLASSP([a], lr=0.1, threshold=0.0, eps=0.0, p=2.0)
    ob = torch.optim.Adagrad([b], lr=0.1, eps=0.0)
    for g in rows:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_classp_bad_arguments():
    q = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="^p:"):
        CLASSP(q, p=0)
    with pytest.raises(ValueError, match="^threshold:"):
        CLASSP(q, threshold=-1)
    with pytest.raises(ValueError, match="^lr:"):
        CLASSP(q, lr=-0.1)
    with pytest.raises(TypeError, match="^params:"):
        CLASSP([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


# ---------------------------------------------------------------------------------------------
# both: a step reads nothing back to the host (on a GPU every read is a sync)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: SPAM(ps, **SPAM_HP, state_dtype="int8"),
    lambda ps: SPAM(ps, **SPAM_HP),
    lambda ps: CLASSP(ps),
    lambda ps: CLASSP(ps, threshold=1e-4, eps=1e-6, p=2.0),
], ids=["spam-int8", "spam-fp32", "classp-relative", "classp-explicit"])
def test_step_reads_nothing_back(monkeypatch, make):
    """40 steps with spikes, resets and a NaN gradient on one tensor, with every way of reading a
    tensor's value made to raise; the skipped tensor is left as it was, and the counts add up when
    `stats` is read afterwards."""
    from test_stable_spam_device import _refuse_host_reads

    ps = [torch.nn.Parameter(torch.ones(300)), torch.nn.Parameter(torch.ones(8, 16))]
    rows = spam_stream(40)
    opt = make(ps)
    with monkeypatch.context() as m:
        _refuse_host_reads(m)
        for t, g in enumerate(rows):
            ps[0].grad = torch.cat([g, g[:100]]).float()
            ps[1].grad = g[:128].reshape(8, 16).float() * (float("nan") if t == 20 else 1.0)
            before = ps[1].detach().clone()
            opt.step()
            if t == 20:
                assert torch.equal(ps[1].detach(), before)
    assert opt.stats["nonfinite_skipped"] == 1 and opt.stats["steps"] == 40
    assert all(torch.isfinite(p).all() for p in ps)
