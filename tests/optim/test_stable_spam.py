"""StableSPAM against independent per-tensor references written from the paper's equations.

The references below work in float64 on one tensor at a time, with no code shared with
`lowbit.optim`. `reference_clean` is the paper's algorithm with the fixes the class docstring
lists; `reference_official` adds the quirks of the authors' code (docstring items 1-4, 6).
"""
import copy
import io
import math
import re

import pytest
import torch

from lowbit.optim import StableSPAM

SHAPES = [(16, 8), (8,), (300,)]
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, theta=0.999)


def grad_stream(steps, seed=1, skip=True):
    """Per step, one gradient (or None) per tensor: N(0, 0.01^2), x1000 on 3 entries every 17
    steps (and on one whole step), tensor 1 without a gradient every 5th step (so it has none on
    the reset steps 120 and 240 used below)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        row = []
        for i, s in enumerate(SHAPES):
            x = torch.randn(s, generator=g) * 0.01
            if t % 17 == 0:
                idx = torch.randint(0, x.numel(), (3,), generator=g)
                x.view(-1)[idx] *= 1000
            if t == 150:
                x *= 1000
            row.append(None if (skip and i == 1 and t % 5 == 0) else x)
        out.append(row)
    return out


def init_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def run_lowbit(stream, dtype=torch.float64, **kw):
    """fp64 parameters by default: the optimizer then computes in fp64, so the comparison with
    the fp64 references measures the algorithm, not fp32 rounding of the weights."""
    ps = [torch.nn.Parameter(p.to(dtype)) for p in init_params()]
    opt = StableSPAM(ps, **{**HP, **kw})
    for row in stream:
        for p, g in zip(ps, row):
            p.grad = None if g is None else g.to(dtype, copy=True)
        opt.step()
    return [p.detach() for p in ps], opt


def cosine(T, total, eta, official):
    if total is None:
        return 1.0
    if official:
        return eta + (1 - eta) * (1 + math.cos(math.pi * T / (total + 1))) / 2
    return eta + (1 - eta) * (1 + math.cos(math.pi * min(T, total) / total)) / 2


def reference_clean(stream, reset_interval, total_steps=None, eta_min=0.5):
    lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    g1_, g2, th = HP["gamma1"], HP["gamma2"], HP["theta"]
    params = [p.double() for p in init_params()]
    st = [dict(k=0, M=0.0, mu=0.0, nu=0.0, P1=1.0, j=0, Pb=1.0, m=torch.zeros_like(p), v=torch.zeros_like(p),
               interval=0) for p in params]
    for T, row in enumerate(stream, 1):
        s = cosine(T, total_steps, eta_min, official=False)
        for i, g in enumerate(row):
            if g is None:
                continue
            g, x, S = g.double(), params[i], st[i]
            S["k"] += 1
            a = g.abs().max().item()
            S["M"] = th * S["M"] + (1 - th) * a
            Mh = S["M"] / (1 - th ** S["k"])
            g = torch.where(g.abs() > Mh, g / a * Mh, g)
            n = g.norm().item()
            g1 = g1_ * s
            S["mu"] = g1 * S["mu"] + (1 - g1) * n
            S["nu"] = g2 * S["nu"] + (1 - g2) * n * n
            S["P1"] *= g1
            c = (S["mu"] / (1 - S["P1"])) / (math.sqrt(S["nu"] / (1 - g2 ** S["k"])) + eps)
            if n > 0:
                g = g / n * c
            if T // reset_interval != S["interval"]:  # first step of this tensor in a new interval
                S["interval"] = T // reset_interval
                S["m"], S["v"], S["j"], S["Pb"] = torch.zeros_like(x), torch.zeros_like(x), 0, 1.0
            S["j"] += 1
            bb1 = b1 * s
            S["Pb"] *= bb1
            S["m"] = bb1 * S["m"] + (1 - bb1) * g
            S["v"] = b2 * S["v"] + (1 - b2) * g * g
            mh = S["m"] / (1 - S["Pb"])
            vh = S["v"] / (1 - b2 ** S["j"])
            params[i] = x * (1 - lr * wd) - lr * mh / (vh.sqrt() + eps)
    return params


def reference_official(stream, reset_interval, total_steps=None, eta_min=0.5):
    lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    g1_, g2, th = HP["gamma1"], HP["gamma2"], HP["theta"]
    params = [p.double() for p in init_params()]
    st = [dict(k=0, M=0.0, mu=0.0, nu=0.0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]
    for T, row in enumerate(stream, 1):
        s = cosine(T, total_steps, eta_min, official=True)  # quirk 4: periodic, T_max = total + 1
        for i, g in enumerate(row):
            if g is None:
                continue  # quirk 6: k lags T for this tensor
            g, S = g.double(), st[i]
            x = params[i] * (1 - lr * wd)
            S["k"] += 1
            a = g.abs().max().item()
            S["M"] = th * S["M"] + (1 - th) * a
            Mh = S["M"] / (1 - th ** S["k"])  # quirk 1: k restarts at resets, M does not
            g = torch.where(g.abs() > Mh, g / a * Mh, g)
            n = g.norm().item()
            g1 = g1_ * s
            S["mu"] = g1 * S["mu"] + (1 - g1) * n
            S["nu"] = g2 * S["nu"] + (1 - g2) * n * n
            c = (S["mu"] / (1 - g1 ** S["k"])) / (math.sqrt(S["nu"] / (1 - g2 ** S["k"])) + eps)  # quirk 3
            if n > 0:
                g = g / n * c
            reset = T % reset_interval == 0
            if reset:
                S["k"] = 1  # quirk 2: this step still uses the old moments, with k = 1
            bb1 = b1 * s
            m = bb1 * S["m"] + (1 - bb1) * g
            v = b2 * S["v"] + (1 - b2) * g * g
            bc1, bc2 = 1 - bb1 ** S["k"], 1 - b2 ** S["k"]
            params[i] = x - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps)
            S["m"], S["v"] = (torch.zeros_like(m), torch.zeros_like(v)) if reset else (m, v)
    return params


def max_err(a, b):
    return max((x.double() - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("foreach", [True, False])
def test_clean_matches_reference_300_steps_with_spikes_and_reset(foreach):
    stream = grad_stream(300)
    got, opt = run_lowbit(stream, reset_interval=120, foreach=foreach)
    ref = reference_clean(stream, 120)
    assert opt.stats["resets"] == 2 and opt.stats["clipped"] > 0
    assert max_err(got, ref) < 1e-6
    # the comparison has teeth: the official quirks move the weights by far more than 1e-6
    assert max_err(got, reference_official(stream, 120)) > 1e-4


def test_fp32_params_within_weight_rounding_of_reference():
    """fp32 weights: each step rounds p twice (decay, update), each time by at most half an ulp of
    max|p| < 4, so 300 steps drift at most 300 * ulp(4) = 300 * 2^-21 from the fp64 reference."""
    stream = grad_stream(300)
    got, _ = run_lowbit(stream, dtype=torch.float32, reset_interval=120)
    assert max(p.abs().max().item() for p in got) < 4
    assert max_err(got, reference_clean(stream, 120)) < 300 * 2.0 ** -21


def test_clean_matches_reference_with_cosine_schedule():
    stream = grad_stream(300)
    got, _ = run_lowbit(stream, reset_interval=120, total_steps=200, eta_min=0.5)
    assert max_err(got, reference_clean(stream, 120, total_steps=200)) < 1e-6


@pytest.mark.parametrize("total_steps", [None, 140])
def test_official_matches_quirk_reference(total_steps):
    stream = grad_stream(300)
    got, _ = run_lowbit(stream, reset_interval=120, total_steps=total_steps, compat="official")
    assert max_err(got, reference_official(stream, 120, total_steps=total_steps)) < 1e-6
    assert max_err(got, reference_clean(stream, 120, total_steps=total_steps)) > 1e-4


def test_official_reset_switches_adaclip_off_clean_does_not():
    """Quirk 1: after a reset the official threshold is divided by 1 - theta^2 though M is warm,
    so a x20 outlier right after the reset passes unclipped; the clean mode clips it."""
    R = 100
    g = torch.Generator().manual_seed(3)
    stream = [[torch.randn(s, generator=g) * 0.01 for s in SHAPES] for _ in range(R + 1)]
    stream[R][2].view(-1)[5] = 20 * stream[R][2].abs().max()
    counts = {}
    for compat in (None, "official"):
        ps = [torch.nn.Parameter(p.clone()) for p in init_params()]
        opt = StableSPAM(ps, **HP, reset_interval=R, compat=compat)
        for t, row in enumerate(stream, 1):
            for p, x in zip(ps, row):
                p.grad = x.clone()
            before = opt.stats["clipped"]
            opt.step()
        counts[compat] = opt.stats["clipped"] - before
    assert counts[None] >= 1 and counts["official"] == 0


def test_grad_untouched_in_clean_mode_clipped_in_official():
    """Quirk 5: the official code writes the AdaClip result into p.grad."""
    stream = grad_stream(40, skip=False)
    for compat in (None, "official"):
        ps = [torch.nn.Parameter(p.clone()) for p in init_params()]
        opt = StableSPAM(ps, **HP, compat=compat)
        changed = False
        for row in stream:
            for p, x in zip(ps, row):
                p.grad = x.clone()
            opt.step()
            changed |= any(not torch.equal(p.grad, x) for p, x in zip(ps, row))
        assert changed == (compat == "official")


def _bits(ts):
    return [t.detach().clone() for t in ts]


@pytest.mark.parametrize("compat", [None, "official"])
@pytest.mark.parametrize("total_steps", [None, 150])
def test_foreach_bit_exact_with_per_tensor(compat, total_steps):
    stream = grad_stream(300)
    stream[40][2] = stream[40][2].clone()
    stream[40][2].view(-1)[7] = float("nan")
    stream[90][0] = stream[90][0].clone()
    stream[90][0][1, 1] = float("inf")
    runs = {}
    for foreach in (True, False):
        got, opt = run_lowbit(stream, dtype=torch.float32, reset_interval=100, total_steps=total_steps,
                              compat=compat, foreach=foreach)
        state = [opt.state[p] for p in opt.param_groups[0]["params"]]
        runs[foreach] = (got, state, dict(opt.stats))
    (pa, sa, ca), (pb, sb, cb) = runs[True], runs[False]
    assert ca == cb and ca["nonfinite_skipped"] == 2
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.mark.parametrize("foreach", [True, False])
def test_nonfinite_gradient_skipped_and_counted(foreach):
    ps = [torch.nn.Parameter(p.clone()) for p in init_params()]
    opt = StableSPAM(ps, **HP, foreach=foreach)
    stream = grad_stream(3, skip=False)
    for row in stream[:2]:
        for p, x in zip(ps, row):
            p.grad = x.clone()
        opt.step()
    before_p = _bits(ps)
    before_s = copy.deepcopy([opt.state[p] for p in ps])
    for p, x in zip(ps, stream[2]):
        p.grad = x.clone()
    ps[0].grad[0, 0] = float("nan")
    ps[2].grad[3] = -float("inf")
    opt.step()
    assert opt.stats["nonfinite_skipped"] == 2
    for i in (0, 2):
        assert torch.equal(ps[i], before_p[i])
        for k, v in before_s[i].items():
            now = opt.state[ps[i]][k]
            assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v
        assert torch.isfinite(opt.state[ps[i]]["exp_avg"]).all()
    assert not torch.equal(ps[1], before_p[1])


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "fp8", "int8"])
def test_state_dict_round_trip_continues_identically(state_dtype):
    stream = grad_stream(60)
    ps = [torch.nn.Parameter(p.clone()) for p in init_params()]
    opt = StableSPAM(ps, **HP, reset_interval=40, total_steps=50, state_dtype=state_dtype)

    def feed(params, o, rows):
        for row in rows:
            for p, x in zip(params, row):
                p.grad = None if x is None else x.clone()
            o.step()

    feed(ps, opt, stream[:30])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    feed(ps, opt, stream[30:])
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    ps2 = [torch.nn.Parameter(p) for p in ck["params"]]
    opt2 = StableSPAM(ps2, **HP, reset_interval=40, total_steps=50, state_dtype=state_dtype)
    opt2.load_state_dict(ck["opt"])
    feed(ps2, opt2, stream[30:])
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    for a, b in zip(ps, ps2):
        for k, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == opt2.state[b][k].dtype and torch.equal(v, opt2.state[b][k]), k


def test_zero_gradient_does_not_move_weights():
    p = torch.nn.Parameter(torch.ones(4))
    opt = StableSPAM([p], lr=0.1)
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("kw, exc, name", [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas[1]"),
    (dict(betas=(0.9,)), ValueError, "betas"),
    (dict(reset_interval=0), ValueError, "reset_interval"),
    (dict(reset_interval=-5), ValueError, "reset_interval"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(theta=1.0), ValueError, "theta"),
    (dict(gamma1=1.5), ValueError, "gamma1"),
    (dict(total_steps=0), ValueError, "total_steps"),
    (dict(eta_min=2.0), ValueError, "eta_min"),
    (dict(state_dtype="fp4"), ValueError, "state_dtype"),
    (dict(compat="v2"), ValueError, "compat"),
    (dict(param_rounding="up"), ValueError, "param_rounding"),
])
def test_bad_arguments(kw, exc, name):
    with pytest.raises(exc, match="^" + re.escape(name) + ":"):
        StableSPAM([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_complex_params_rejected():
    with pytest.raises(TypeError, match="^params:"):
        StableSPAM([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.parametrize("foreach", [True, False])
def test_sparse_gradient_rejected(foreach):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = StableSPAM(emb.parameters(), foreach=foreach)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="^grad:"):
        opt.step()


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "fp8", "int8"])
@pytest.mark.parametrize("foreach", [True, False])
def test_empty_and_scalar_params(state_dtype, foreach):
    ps = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.tensor(1.0)),
          torch.nn.Parameter(torch.zeros(3, 0, 2))]
    opt = StableSPAM(ps, lr=1e-3, state_dtype=state_dtype, foreach=foreach)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    # a constant gradient: every step moves the scalar by about lr (sign-like Adam step)
    assert ps[1].item() == pytest.approx(1 - 3e-3, abs=1e-5)
    assert ps[0].numel() == 0 and ps[2].shape == (3, 0, 2)
