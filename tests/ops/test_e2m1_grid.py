"""Round-to-nearest-even onto E2M1 (the FP4 element) against an independently written table.

Three routes reach the element rounding with a unit scale, so the result must equal the table
exactly for every bf16 value in range:
  * `ref.round_to_element` directly (all 65,536 patterns, Inf/NaN included);
  * MXFP4 quantize with a 4.0 in every 32-block, so the floor rule gives scale 2^0 (|x| < 8);
  * NVFP4 quantize with global_amax=448 (s_enc = 6) and a 6.0 in every 16-block (s_blk = 6),
    so x * s_enc / s_blk == x exactly for bf16 x (|x| <= 6).
"""
import math

import pytest
import torch

import lowbit
from _util import E2M1_VALUES, bf16_all, e2m1_rne
from lowbit.backends import ref
from lowbit.formats import E2M1

X = bf16_all().float()


def expected(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([e2m1_rne(v) for v in x.tolist()], dtype=torch.float64)


def decode(packed: torch.Tensor) -> torch.Tensor:
    """Independent FP4 decode: element 2i is the low nibble, bit 3 is the sign."""
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float64)
    return table[codes]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, equal signs of zero, NaN where NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    eq = (a == b) & (torch.signbit(a) == torch.signbit(b))
    return bool((eq | both_nan).all())


def test_table_itself():
    assert [e2m1_rne(v) for v in E2M1_VALUES] == list(E2M1_VALUES)
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    assert {t: e2m1_rne(t) for t in ties} == ties
    assert e2m1_rne(7.0) == 6.0 and e2m1_rne(-1e9) == -6.0
    assert math.copysign(1, e2m1_rne(-0.2)) == -1.0


def test_round_to_element_all_bf16():
    got = ref.round_to_element(X, E2M1, "nearest")
    want = expected(torch.where(torch.isinf(X), torch.copysign(torch.full_like(X, 1e9), X), X))
    assert same(got, want)


def _blocked(values: torch.Tensor, anchor: float, block: int) -> torch.Tensor:
    """Rows of `block`: block - 1 test values, then the anchor that fixes the block's scale."""
    per = block - 1
    n = -(-values.numel() // per) * per
    v = torch.cat([values, torch.zeros(n - values.numel())]).reshape(-1, per)
    return torch.cat([v, torch.full((v.shape[0], 1), anchor)], 1)


def test_mxfp4_unit_scale_all_bf16_below_8(backend):
    vals = X[torch.isfinite(X) & (X.abs() < 8)]
    x = _blocked(vals, 4.0, 32)
    q = lowbit.quantize(x, "mxfp4", backend=backend)
    assert (q.scale.view(torch.uint8) == 127).all()
    got = decode(q.data).reshape(-1, 32)[:, :31].flatten()[: vals.numel()]
    assert same(got, expected(vals))


def test_nvfp4_unit_scale_all_bf16_up_to_6(backend):
    vals = X[torch.isfinite(X) & (X.abs() <= 6)]
    x = _blocked(vals, 6.0, 16)
    q = lowbit.quantize(x, "nvfp4", global_amax=448.0, backend=backend)
    assert float(q.global_scale) == 6.0
    assert (q.scale.float() == 6.0).all()
    got = decode(q.data).reshape(-1, 16)[:, :15].flatten()[: vals.numel()]
    assert same(got, expected(vals))
