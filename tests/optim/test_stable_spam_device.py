"""Stable-SPAM keeps its per-tensor statistics on the device: a step never reads a tensor back to the
host (on a GPU such a read is a sync), a state saved as Python floats by earlier versions still
loads, and the fp64 statistics survive a state_dict round trip."""
import math

import pytest
import torch

from lowbit import backends
from lowbit.optim import StableSPAM, spam_scalars

from test_stable_spam import HP, SHAPES, grad_stream

NATIVE = backends.why_unavailable("cpu", "optim_adam_step", "cpu") is None


def _refuse_host_reads(monkeypatch):
    """Every way Python code reads a tensor's value raises."""
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a host read in the optimizer step: Tensor.{name}")
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def _params():
    return [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]


@pytest.mark.parametrize("backend", ["ref"] + (["cpu"] if NATIVE else []))
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("compat", [None, "official"])
def test_step_reads_nothing_back(monkeypatch, backend, state_dtype, compat):
    """60 steps with spikes, two resets, a NaN and an Inf gradient and a tensor without a gradient
    every 5th step, under a cosine schedule: no tensor value reaches Python during `step`, and the
    counts it made on the device add up when `stats` is read afterwards."""
    stream = grad_stream(60)
    stream[12][2] = stream[12][2].clone()
    stream[12][2][3] = float("nan")
    stream[31][0] = stream[31][0].clone()
    stream[31][0][0, 0] = float("inf")
    ps = _params()
    opt = StableSPAM(ps, **HP, reset_interval=25, total_steps=50, state_dtype=state_dtype, compat=compat)
    with backends.use_backend(backend), monkeypatch.context() as m:
        _refuse_host_reads(m)
        for row in stream:
            for p, g in zip(ps, row):
                p.grad = None if g is None else g.clone()
            opt.step()
    assert opt.stats["nonfinite_skipped"] == 2 and opt.stats["clipped"] > 0 and opt.stats["resets"] == 2
    assert all(torch.isfinite(p).all() for p in ps)


def test_skipped_tensor_keeps_its_low_precision_moments():
    """A tensor whose gradient holds NaN keeps its stored int8 moments, scales and statistics bit for
    bit (no decode / encode round trip), while the other tensors step."""
    ps = _params()
    opt = StableSPAM(ps, **HP, state_dtype="int8")
    for row in grad_stream(5, skip=False):
        for p, g in zip(ps, row):
            p.grad = g.clone()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    w0, w1 = ps[0].detach().clone(), ps[1].detach().clone()
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[0].grad[1, 2] = float("nan")
    with backends.use_backend("ref"):
        opt.step()
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in before.items())
    assert torch.equal(ps[0].detach(), w0) and not torch.equal(ps[1].detach(), w1)


def _legacy(opt, p) -> dict:
    """The state of `p` as earlier versions saved it: the statistics as Python floats."""
    st = dict(opt.state[p])
    row = dict(zip(spam_scalars.COLS, st.pop("scalars").tolist()))
    st.update(step=int(row["k"]), clip_max=row["clip_max"], norm_mean=row["norm_mean"],
              norm_sq_mean=row["norm_sq_mean"], gamma1_prod=row["gamma1_prod"], beta1_prod=row["beta1_prod"],
              reset_epoch=int(row["reset_epoch"]),
              moment_step=round(math.log(row["beta2_prod"]) / math.log(0.999)))
    return st


def test_state_saved_as_floats_loads_and_continues():
    """A checkpoint with the statistics as Python floats converts on the first step; the run then
    follows the uninterrupted one up to the last bits of the bias corrections (theta^k from a power
    instead of a running product)."""
    stream = grad_stream(40, skip=False)
    ps = _params()
    opt = StableSPAM(ps, **HP, reset_interval=15)
    for row in stream[:20]:
        for p, g in zip(ps, row):
            p.grad = g.clone()
        opt.step()
    sd = opt.state_dict()
    sd["state"] = {i: _legacy(opt, p) for i, p in enumerate(ps)}
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = StableSPAM(qs, **HP, reset_interval=15)
    other.load_state_dict(sd)
    for row in stream[20:]:
        for p, q, g in zip(ps, qs, row):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    assert "step" not in other.state[qs[0]] and other.state[qs[0]]["scalars"].dtype == torch.float64
    torch.testing.assert_close(other.state[qs[0]]["scalars"], opt.state[ps[0]]["scalars"], rtol=1e-12, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_state_dict_keeps_fp64_statistics():
    """torch's load_state_dict casts state tensors to the parameter's dtype; the fp64 statistics of a
    bf16 parameter must come back in fp64, bit for bit."""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = StableSPAM([p], **HP)
    for row in grad_stream(3, skip=False):
        p.grad = row[2][:64].to(torch.bfloat16)
        opt.step()
    other = StableSPAM([torch.nn.Parameter(p.detach().clone())], **HP)
    other.load_state_dict(opt.state_dict())
    got = next(iter(other.state.values()))["scalars"]
    assert got.dtype == torch.float64 and torch.equal(got, opt.state[p]["scalars"])
