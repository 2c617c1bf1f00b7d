"""Every bf16 bit pattern through `lowbit.cast`, against torch's own casts.

torch and lowbit give the same bits wherever torch defines the same answer: every input whose
round-to-nearest-even result is a finite value of the target. The differences are deliberate and
tested explicitly here:
  * NaN: lowbit writes the canonical positive NaN (E4M3/E5M2 0x7F, fp16 0x7E00); torch keeps the
    sign (0xFF for a negative NaN) and, for fp16, the payload.
  * Overflow in E5M2 and fp16: torch follows IEEE and returns +-Inf; lowbit saturates finite values
    to +-max (a "satfinite" cast, DESIGN section 2). Inf itself stays Inf.
  * E4M3 has no Inf: lowbit maps Inf and finite overflow to +-448 (torch 2.13 saturates finite
    overflow too; older torch returned NaN, so torch's side is only checked to be 448 or NaN).
"""
import math

import pytest
import torch

import lowbit
from _util import bf16_all

X = bf16_all()
FINITE = torch.isfinite(X.float())
NAN = torch.isnan(X.float())
INF = torch.isinf(X.float())
CANONICAL_NAN = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7F, torch.float16: 0x7E00}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8 if t.element_size() == 1 else torch.int16).to(torch.int32) & 0xFFFF


def test_all_patterns_enumerated():
    b = bits(X)
    assert torch.equal(b, torch.arange(1 << 16, dtype=torch.int32))
    assert int(NAN.sum()) == 254 and int(INF.sum()) == 2


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16])
def test_matches_torch_where_torch_result_is_finite(backend, dtype):
    ours = lowbit.cast(X, dtype, backend=backend)
    theirs = X.to(dtype)
    assert ours.dtype == dtype and ours.shape == X.shape
    defined = FINITE & torch.isfinite(theirs.float())
    assert int(defined.sum()) > 30000
    assert torch.equal(bits(ours)[defined], bits(theirs)[defined])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16])
def test_nan_is_canonical(backend, dtype):
    ours = lowbit.cast(X, dtype, backend=backend)
    assert torch.isnan(ours.float()[NAN]).all()
    assert (bits(ours)[NAN] == CANONICAL_NAN[dtype]).all()
    assert torch.isnan(X.to(dtype).float()[NAN]).all()  # torch agrees it is NaN, sign/payload aside


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float16])
def test_overflow_saturates_where_torch_gives_inf(backend, dtype):
    fmax = torch.finfo(dtype).max
    ours = lowbit.cast(X, dtype, backend=backend).float()
    theirs = X.to(dtype).float()
    overflow = FINITE & torch.isinf(theirs)
    # an IEEE cast overflows exactly when |x| >= max + half an ulp at max
    mbits = {torch.float8_e5m2: 2, torch.float16: 10}[dtype]
    half_ulp = 2.0 ** (math.floor(math.log2(fmax)) - mbits - 1)
    assert torch.equal(overflow, FINITE & (X.float().abs() >= fmax + half_ulp))
    assert int(overflow.sum()) > 0
    assert torch.equal(ours[overflow], torch.copysign(torch.full_like(ours[overflow], fmax), X.float()[overflow]))
    assert torch.equal(ours[INF], X.float()[INF])  # Inf stays Inf


def test_e4m3_saturates_overflow_and_inf(backend):
    ours = lowbit.cast(X, torch.float8_e4m3fn, backend=backend).float()
    x = X.float()
    big = ~NAN & (x.abs() > 448)  # includes +-Inf
    assert int(big.sum()) > 1000
    assert torch.equal(ours[big], torch.copysign(torch.full_like(x[big], 448.0), x[big]))
    theirs = X.to(torch.float8_e4m3fn).float()[big & FINITE]
    assert ((theirs.abs() == 448) | torch.isnan(theirs)).all()


def test_bf16_to_bf16_is_identity_except_nan_payload(backend):
    ours = lowbit.cast(X, torch.bfloat16, backend=backend)
    assert torch.equal(bits(ours)[~NAN], bits(X)[~NAN])
    assert (bits(ours)[NAN] == 0x7FC0).all()


def test_fp32_to_bf16_matches_torch_on_random_bit_patterns(backend):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32)
    ours = lowbit.cast(x, torch.bfloat16, backend=backend)
    theirs = x.to(torch.bfloat16)
    defined = torch.isfinite(x) & torch.isfinite(theirs.float())
    assert torch.equal(bits(ours)[defined], bits(theirs)[defined])
    # fp32 values that overflow bf16 under RNE saturate to bf16 max
    over = torch.isfinite(x) & torch.isinf(theirs.float())
    fmax = torch.finfo(torch.bfloat16).max
    assert torch.equal(ours.float()[over].abs(), torch.full((int(over.sum()),), fmax))
