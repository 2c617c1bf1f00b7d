"""Random Hadamard transform: exact matrix, orthonormality, inverse, fp64 product invariance, and
the measured effect on NVFP4 error (DESIGN section 3).

Error bound used below (derived, not tuned). The transform of one row x runs n = log2(b) butterfly
stages in fp32 and one multiply by c_b = fp32(1/sqrt(b)). Stage k rounds each output with relative
error <= u = 2^-24; the vector entering stage k has norm 2^((k-1)/2) ||x|| and the remaining stages
scale an error by 2^((n-k)/2), so the unnormalised result is off by <= n u sqrt(b) ||x||. The
rounding of c_b and of the final multiply add 2u ||x|| after normalisation. Hence, to first order,
||H^(x) - H x|| <= (n + 2) u ||x||, and for two rows a, b (H orthonormal, so <Ha, Hb> = <a, b>):
|<H^(a), H^(b)> - <a, b>| <= 2 (n + 2) u ||a|| ||b||, plus the fp64 dot product's K 2^-53 ||a|| ||b||.
"""
import math

import pytest
import torch

import lowbit
from _util import philox4x32_10, sqnr_db

U = 2.0**-24


def sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def signs(b: int, seed) -> torch.Tensor:
    """s_j = -1 iff the top bit of word j mod 4 of Philox((j div 4, 0, 1, 0), seed key) is set."""
    if seed is None:
        return torch.ones(b, dtype=torch.float64)
    out = []
    for j in range(b):
        w = philox4x32_10((j // 4, 0, 1, 0), (seed & 0xFFFFFFFF, seed >> 32))[j % 4]
        out.append(-1.0 if w >> 31 else 1.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("b", [16, 64, 512])
@pytest.mark.parametrize("seed", [None, 3])
def test_matrix_is_signed_sylvester_and_orthonormal(backend, b, seed):
    m = lowbit.hadamard(torch.eye(b), b, seed=seed, backend=backend).double()
    c = float(torch.tensor(1 / math.sqrt(b), dtype=torch.float32))
    want = signs(b, seed).unsqueeze(1) * sylvester(b) * c
    assert torch.equal(m, want)  # exact: the butterfly of a unit vector adds only +-1 and 0
    gram = m @ m.T
    # off-diagonal sums cancel exactly; the diagonal sums b copies of c^2 in fp64
    assert ((gram - torch.eye(b, dtype=torch.float64) * (b * c * c)).abs() <= b * 2.0**-52).all()
    assert abs(b * c * c - 1) <= 2 * U
    if seed is not None:
        assert (signs(b, seed) < 0).any() and (signs(b, seed) > 0).any()


@pytest.mark.parametrize("b", [16, 4096])
def test_inverse_round_trip(backend, b):
    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))
    y = lowbit.hadamard(x, b, seed=11, backend=backend)
    back = lowbit.hadamard(y, b, seed=11, inverse=True, backend=backend)
    n = int(math.log2(b))
    err = (back.double() - x.double()).norm(dim=1)
    assert (err <= 2 * (n + 2) * U * x.double().norm(dim=1) * 1.001).all()
    assert not torch.equal(y, x)


def test_other_axis_and_dtype(backend):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = lowbit.hadamard(x, 32, seed=1, axis=0, backend=backend)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    want = lowbit.hadamard(x.t().contiguous(), 32, seed=1, backend=backend).t()
    assert torch.equal(y, want)


@pytest.mark.parametrize("b", [16, 128, 1024])
def test_fp64_product_invariance(backend, b):
    g = torch.Generator().manual_seed(3)
    M, N, K = 32, 24, 1024
    a = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    c = torch.randn(N, K, generator=g)
    ha = lowbit.hadamard(a, b, seed=5, backend=backend).double()
    hc = lowbit.hadamard(c, b, seed=5, backend=backend).double()
    exact = a.double() @ c.double().T
    n = int(math.log2(b))
    bound = (2 * (n + 2) * U + 2 * K * 2.0**-53) * torch.outer(a.double().norm(dim=1), c.double().norm(dim=1))
    assert ((ha @ hc.T - exact).abs() <= bound * 1.001).all()


# ----------------------------------------------------------------------------------- NVFP4 facts
def _tensor_sqnr(x, h, backend):
    q = lowbit.quantize(x, "nvfp4", hadamard=h, seed=1, backend=backend)
    d = q.dequantize(backend=backend)
    if h:
        d = lowbit.hadamard(d, h, seed=1, inverse=True, backend=backend)
    return sqnr_db(x, d)


def _gemm_sqnr(a, b, h, backend):
    qa = lowbit.quantize(a, "nvfp4", hadamard=h, seed=7, backend=backend)
    qb = lowbit.quantize(b, "nvfp4", hadamard=h, seed=7, backend=backend)
    return sqnr_db(a.double() @ b.double().T, lowbit.qmatmul(qa, qb, backend=backend))


def test_rht_does_not_raise_nvfp4_sqnr_on_iid_normal(backend):
    """N(0,1): RHT-16 leaves NVFP4 SQNR where it was (measured +0.01 dB tensor, +0.03 dB GEMM);
    the rotated values are again i.i.d. normal, so there is nothing for it to even out."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g)
    w = torch.randn(128, 1024, generator=g)
    assert _tensor_sqnr(x, 16, backend) - _tensor_sqnr(x, None, backend) < 0.1
    assert _gemm_sqnr(x, w, 16, backend) - _gemm_sqnr(x, w, None, backend) < 0.1


def test_rht_lowers_nvfp4_sqnr_on_student_t(backend):
    """Student-t(3), i.i.d.: the issue text expects RHT to raise NVFP4 SQNR on heavy-tailed data,
    but it lowers it (measured -0.67 to -0.76 dB with b=16 over three seeds; DESIGN section 3 reports 0.5-4 dB lower on
    i.i.d. heavy-tailed data). Mixing a block's outlier into its 15 neighbours makes the whole
    block Gaussian-like at a scale set by the outlier, which costs more than the rare outlier did."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # for the chi-squared draws
    x = torch.randn(512, 1024, generator=g) / torch.sqrt(
        torch.distributions.Chi2(3.0).sample((512, 1024)) / 3.0)
    assert _tensor_sqnr(x, 16, backend) - _tensor_sqnr(x, None, backend) < -0.3


def test_rht_raises_gemm_sqnr_when_magnitudes_vary_inside_blocks(backend):
    """Operands scaled per row and per column (log-normal, sigma 0.5, the column scales shared by
    both operands as a channel-wise activation/weight pattern): magnitudes vary along the
    reduction dim inside each block, the rotation evens them out, and GEMM SQNR rises (measured
    +0.6..+1.1 dB at b=16 and +1.4..+1.6 dB at b=64 over four seeds; DESIGN: +0.4 / +0.9 dB). With
    independent column scales per operand or sigma >= 1 the gain turns into a loss, so this is the
    documented case, not a general rule."""
    g = torch.Generator().manual_seed(1)
    M, N, K = 256, 256, 1024
    col = torch.exp(0.5 * torch.randn(1, K, generator=g))
    a = torch.randn(M, K, generator=g) * torch.exp(0.5 * torch.randn(M, 1, generator=g)) * col
    b = torch.randn(N, K, generator=g) * torch.exp(0.5 * torch.randn(N, 1, generator=g)) * col
    plain = _gemm_sqnr(a, b, None, backend)
    gain16 = _gemm_sqnr(a, b, 16, backend) - plain
    gain64 = _gemm_sqnr(a, b, 64, backend) - plain
    assert gain16 >= 0.4
    assert gain64 > gain16
