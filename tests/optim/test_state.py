"""Low-precision moment storage: formats, round trips, bytes per parameter."""
import math

import pytest
import torch

import lowbit
from lowbit.optim import SPAM, STATE_DTYPES, StableSPAM, measured_state_bytes, state_bytes_per_param
from lowbit.optim import state as S
from lowbit.optim import spam_scalars


def test_bytes_per_param_table():
    # two moments: 4 B / 2 B / 1 B per element, plus one fp32 scale per 128 (fp8) or 256 (int8) elements
    assert state_bytes_per_param("fp32") == 8.0
    assert state_bytes_per_param("bf16") == 4.0
    assert state_bytes_per_param("fp8") == 2 * (1 + 4 / 128)
    assert state_bytes_per_param("int8") == 2 * (1 + 4 / 256)
    with pytest.raises(ValueError, match="^state_dtype:"):
        state_bytes_per_param("fp16")


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_measured_bytes_match_table(state_dtype):
    # numel a multiple of 256 so no block padding: the measurement equals the table exactly, plus
    # each tensor's row of fp64 scalar statistics
    ps = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(512))]
    opt = StableSPAM(ps, state_dtype=state_dtype)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in ps)
    scalars = len(ps) * len(spam_scalars.COLS) * 8
    assert measured_state_bytes(opt) == opt.state_bytes() == n * state_bytes_per_param(state_dtype) + scalars
    assert opt.state[ps[0]]["exp_avg"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                 "fp8": torch.float8_e4m3fn, "int8": torch.uint8}[state_dtype]
    if state_dtype == "fp8":
        assert opt.state[ps[0]]["exp_avg_sq"].dtype == torch.float8_e5m2


def test_dynamic_codebook_structure():
    for signed in (True, False):
        code = S.dynamic_codebook(signed)
        assert code.numel() == 256 and torch.all(code[1:] > code[:-1])  # sorted, distinct
        assert code.max().item() == 1.0 and (code == 0).sum().item() == 1
        pos = code[code > 0]
        assert math.isclose(pos.min().item(), 0.55e-6, rel_tol=1e-6) if signed else \
            math.isclose(pos.min().item(), 0.325e-6, rel_tol=1e-6)
    assert S.dynamic_codebook(False).min().item() == 0.0
    assert (S.dynamic_codebook(True) < 0).sum().item() == 127


@pytest.mark.parametrize("signed", [True, False])
def test_int8_round_trip_is_nearest_code(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-4, 0, 1000)
    if not signed:
        x = x.abs()
    codes, absmax = S.int8_encode(x, signed)
    assert codes.shape == (4, 256) and absmax.shape == (4,)
    y = S.int8_decode(codes, absmax, signed, x.shape)
    # independent nearest-code search over the whole book, block by block
    book = S.dynamic_codebook(signed).double()
    xb = torch.cat([x, x.new_zeros(24)]).view(4, 256).double()
    amax = xb.abs().amax(1, keepdim=True)
    err_best = ((xb / amax)[..., None] - book).abs().min(-1).values * amax
    err = (torch.cat([y, y.new_zeros(24)]).view(4, 256).double() - xb).abs()
    # fp32 normalisation x / absmax (<= 2^-24 relative), the fp32 code book and the fp32 decode
    # (<= 2^-24 each) can each move a value by at most 2^-24 * absmax: the code chosen is the
    # nearest up to 4 * 2^-24 * absmax
    assert torch.all(err <= err_best + 4 * 2.0 ** -24 * amax)
    assert torch.equal(y.abs().amax(), x.abs().amax())  # the block max is exact


@pytest.mark.parametrize("name, fmt", [("exp_avg", "fp8_e4m3"), ("exp_avg_sq", "fp8_e5m2")])
def test_fp8_moment_matches_lowbit_quantize_on_padded_blocks(name, fmt):
    x = torch.randn(7, 50)  # 350 elements -> 3 blocks of 128, the last zero padded
    if name == "exp_avg_sq":
        x = x * x
    st = {}
    S.store_moment(st, name, x, "fp8", seed=0)
    assert st[name].shape == (3, 128) and st[name + "_scale"].shape == (3, 1)
    flat = torch.cat([x.reshape(-1), torch.zeros(34)]).view(3, 128)
    want = lowbit.dequantize(lowbit.quantize(flat, fmt, block=(1, 128))).reshape(-1)[:350].reshape(7, 50)
    assert torch.equal(S.load_moment(st, name, x.shape, "fp8"), want)


def test_bf16_store_is_stochastic_rounding_with_distinct_seeds():
    x = torch.full((4096,), 1.0 + 2 ** -10)  # between bf16 neighbours 1 and 1 + 2^-7, 1/8 of the way
    st = {}
    S.store_moment(st, "exp_avg", x, "bf16", seed=S.sr_seed(0, 1, 0, 0))
    a = st["exp_avg"].float()
    assert set(a.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert torch.equal(st["exp_avg"], lowbit.stochastic_round(x, torch.bfloat16, S.sr_seed(0, 1, 0, 0)))
    # unbiased within 4 standard errors: p = 1/8 of the elements round up
    p, n = 1 / 8, x.numel()
    frac_up = (a > 1).float().mean().item()
    assert abs(frac_up - p) < 4 * math.sqrt(p * (1 - p) / n)
    seeds = {S.sr_seed(0, t, i, m) for t in range(1, 50) for i in range(20) for m in (0, 1, 2)}
    assert len(seeds) == 49 * 20 * 3


@pytest.mark.parametrize("state_dtype", ["bf16", "fp8", "int8"])
def test_spam_runs_with_low_precision_state(state_dtype):
    p = torch.nn.Parameter(torch.randn(300))
    opt = SPAM([p], lr=5e-2, state_dtype=state_dtype, reset_interval=30, warmup_steps=3, clip_delay=2)
    target = torch.randn(300)
    first = None
    for _ in range(60):
        loss = ((p - target) ** 2).sum()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ((p - target) ** 2).sum().item() < 0.5 * first


@pytest.mark.parametrize("foreach", [True, False])
def test_bf16_master_weights_with_stochastic_rounding(foreach):
    """Updates of ~1e-4 on weights near 1 are below half a bf16 ulp (2^-8): round-to-nearest loses
    every one of them, stochastic rounding keeps them in expectation. The fp32 run gives the
    expected value; each SR store adds variance <= ulp^2 / 4 with ulp <= 2^-7 here, so the mean
    over n elements after k steps is within 4 * sqrt(k) * 2^-8 / sqrt(n) of it."""
    n, k = 4096, 60
    finals = {}
    for mode, dtype in [("fp32", torch.float32), ("nearest", torch.bfloat16), ("stochastic", torch.bfloat16)]:
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = StableSPAM([p], lr=1e-4, foreach=foreach, reset_interval=None,
                         param_rounding="stochastic" if mode == "stochastic" else "nearest")
        for _ in range(k):
            p.grad = torch.ones(n, dtype=dtype)
            opt.step()
        finals[mode] = p.detach().float()
    drift = 1 - finals["fp32"].mean().item()
    assert drift > 0.005
    assert torch.equal(finals["nearest"], torch.ones(n))
    assert abs(finals["stochastic"].mean().item() - finals["fp32"].mean().item()) < 4 * math.sqrt(k) * 2 ** -8 / math.sqrt(n)
