"""Stochastic rounding: the exact Philox definition, unbiasedness, variance, determinism.

For a value v between grid neighbours lo (toward zero) and hi, the spec rounds to hi iff
frac = (|v| - |lo|) / (|hi| - |lo|) > u, u = (r >> 8) * 2^-24 with r = r(seed, i), so
P(hi) = frac exactly (frac is a multiple of 2^-24 for the values below). Hence E[q] = v and
Var[q] = (hi - v)(v - lo). With n draws the sample mean has standard error sqrt(Var / n) and the
sample variance sqrt((mu4 - Var^2) / n), mu4 = h^4 p (1 - p)(1 - 3p + 3p^2) for the two-point law
(h = hi - lo, p = frac); both are asserted within 4 of those standard errors.
"""
import math

import pytest
import torch

import lowbit
from _util import decode_minifloat, philox4x32_10, rounding_word
from lowbit.backends import ref

N = 100_000
KAT = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
E4M3_VALUES = sorted({abs(decode_minifloat(c, 4, 3, 7, False, True)) for c in range(127)})
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def neighbours(x: float, grid: list[float]) -> tuple[float, float]:
    a = abs(x)
    lo = max(g for g in grid if g <= a)
    hi = min(g for g in grid if g > a)
    return math.copysign(lo, x), math.copysign(hi, x)


def bf16_neighbours(x: float) -> tuple[float, float]:
    b = torch.tensor([x], dtype=torch.float32).view(torch.int32)
    lo = (b & ~0xFFFF).view(torch.float32)  # truncating the low 16 bits moves toward zero
    hi = ((b & ~0xFFFF) + 0x10000).view(torch.float32)
    return float(lo), float(hi)


def check_moments(q: torch.Tensor, x: float, lo: float, hi: float):
    q = q.double()
    assert set(torch.unique(q).tolist()) <= {lo, hi}
    h = abs(hi - lo)
    p = abs(x - lo) / h
    var = (hi - x) * (x - lo)
    assert var > 0 and math.isclose(var, h * h * p * (1 - p), rel_tol=1e-9)
    n = q.numel()
    assert abs(float(q.mean()) - x) <= 4 * math.sqrt(var / n)
    mu4 = h**4 * p * (1 - p) * (1 - 3 * p + 3 * p * p)
    assert abs(float(q.var(unbiased=True)) - var) <= 4 * math.sqrt((mu4 - var * var) / n)


# ------------------------------------------------------------------- the random bits themselves
def test_philox_known_answer():
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == KAT
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in ref.philox4x32(z, z, z, z, 0)] == KAT
    assert ref.random_bits(0, torch.arange(4)).tolist() == KAT


def test_rounding_bits_follow_the_definition():
    seed = (7 << 32) | 12345  # both key words non-zero
    idx = [0, 1, 2, 3, 4, 5, 1023, 2**32 + 1, 2**34 + 6]  # the last two use counter word 1
    want = [rounding_word(seed, i) for i in idx]
    assert ref.random_bits(seed, torch.tensor(idx)).tolist() == want


def test_cast_rounds_up_exactly_when_frac_exceeds_u(backend):
    x = 1.0 + 0.375 * 2.0**-7  # frac 0.375 between bf16 1 and 1 + 2^-7
    seed = 99
    out = lowbit.cast(torch.full((4, 16), x), torch.bfloat16, rounding="stochastic", seed=seed, backend=backend)
    up = (out.float() > 1.0).flatten().tolist()
    want = [0.375 > (rounding_word(seed, i) >> 8) * 2.0**-24 for i in range(64)]
    assert up == want


def test_quantize_uses_the_callers_flat_index(backend):
    # NVFP4 along axis 0 of a (16, 4) tensor: element (r, c) uses i = r * 4 + c
    x = torch.full((16, 4), 0.75)  # s_enc = 6, s_blk = 6 (the 6.0 per column): v = 0.75, frac 0.5
    x[0] = 6.0
    seed = 5
    q = lowbit.quantize(x, "nvfp4", axis=0, rounding="stochastic", seed=seed, global_amax=448.0, backend=backend)
    d = q.dequantize()
    assert d.shape == x.shape
    for r in range(1, 16):
        for c in range(4):
            u = (rounding_word(seed, r * 4 + c) >> 8) * 2.0**-24
            assert d[r, c].item() == (1.0 if 0.5 > u else 0.5)


# ------------------------------------------------------------------- statistics per path
CAST_CASES = {
    torch.bfloat16: [1.0 + 0.375 * 2.0**-7, -3.0 - 0.8125 * 2.0**-6, 2.0**-130 * 1.3, 1e-3],
    torch.float8_e4m3fn: [0.3, -100.5, 2.6 * 2.0**-9, 447.0],
}


@pytest.mark.parametrize("dtype", sorted(CAST_CASES, key=str))
def test_cast_unbiased_with_binomial_variance(backend, dtype):
    xs = [float(torch.tensor(v, dtype=torch.float32)) for v in CAST_CASES[dtype]]
    x = torch.tensor(xs, dtype=torch.float32).unsqueeze(1).expand(-1, N).contiguous()
    q = lowbit.cast(x, dtype, rounding="stochastic", seed=2024, backend=backend).float()
    for row, v in enumerate(xs):
        lo, hi = bf16_neighbours(v) if dtype == torch.bfloat16 else neighbours(v, E4M3_VALUES)
        check_moments(q[row], v, lo, hi)


def test_cast_saturates_beyond_max(backend):
    x = torch.full((1000,), 460.0)
    q = lowbit.cast(x, torch.float8_e4m3fn, rounding="stochastic", seed=1, backend=backend)
    assert (q.float() == 448.0).all()


FP4_VALUES = [0.3125, 1.1875, -2.6875, 4.875, 5.90625]


def blocks_with_anchor(xs: list[float], anchor: float, block: int) -> tuple[torch.Tensor, int]:
    per = block - 1
    rows = -(-N // per)
    parts = []
    for v in xs:
        b = torch.full((rows, block), v)
        b[:, -1] = anchor
        parts.append(b)
    return torch.cat(parts), rows


@pytest.mark.parametrize("name,anchor,block,kw", [
    ("mxfp4", 4.0, 32, {}),  # floor scale 2^0
    ("nvfp4", 6.0, 16, {"global_amax": 448.0}),  # s_enc = s_blk = 6
])
def test_quantize_unbiased_with_binomial_variance(backend, name, anchor, block, kw):
    x, rows = blocks_with_anchor(FP4_VALUES, anchor, block)
    q = lowbit.quantize(x, name, rounding="stochastic", seed=77, backend=backend, **kw)
    d = q.dequantize().reshape(len(FP4_VALUES), rows, block)
    assert (d[..., -1] == anchor).all()
    for k, v in enumerate(FP4_VALUES):
        lo, hi = neighbours(v, E2M1)
        check_moments(d[k, :, :-1].flatten(), v, lo, hi)


# ------------------------------------------------------------------- determinism
def _sr_outputs(backend, seed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    return [
        lowbit.cast(x, torch.bfloat16, rounding="stochastic", seed=seed, backend=backend).view(torch.int16),
        lowbit.cast(x, torch.float8_e4m3fn, rounding="stochastic", seed=seed, backend=backend).view(torch.uint8),
        lowbit.quantize(x, "mxfp4", rounding="stochastic", seed=seed, backend=backend).data,
        lowbit.quantize(x, "nvfp4", rounding="stochastic", seed=seed, backend=backend).data,
        lowbit.quantize(x, "nvfp4", rounding="stochastic", seed=seed, hadamard=16, backend=backend).data,
    ]


def test_same_seed_same_bits_any_thread_count(backend):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _sr_outputs(backend, 3)
        torch.set_num_threads(max(2, before))
        many = _sr_outputs(backend, 3)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_different_seed_different_bits(backend):
    for a, b in zip(_sr_outputs(backend, 3), _sr_outputs(backend, 4)):
        frac = float((a != b).float().mean())
        assert frac > 0.05, frac
