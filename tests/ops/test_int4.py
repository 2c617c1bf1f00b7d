"""INT4 (Stable-SPAM) against an independent transcription of the official code's formulas.

`official_weight` / `official_act` below follow TianjinYellow/StableSPAM's
utils/act_weight_quantization.py (_quantize_tensor, QLinear.forward) and utils/dummy_quant.py
(fake_topk_quantize / fake_topk_dequantize) line by line, in fp32, with no lowbit code. Nearest
rounding must match them bit for bit; stochastic rounding is checked against the Philox rule
of the spec (tests/ops/_util.py) and for unbiasedness.
"""
import math

import pytest
import torch

import lowbit
from lowbit.formats import FORMATS

from _util import rounding_word

INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def official_weight(w, group):
    """_quantize_tensor + the dequantization in QLinear.forward (fp32)."""
    shape = w.shape
    w = w.reshape(-1, group)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    q = torch.clamp(torch.round(w / scales) + zeros, 0, 15)
    return ((q - zeros) * scales).reshape(shape), q.reshape(shape), scales, zeros


def official_act(x, group, noise=None):
    """fake_topk_quantize (bit 4, topk 2) then fake_topk_dequantize, fp32; `noise` replaces rand_like - 0.5."""
    shape = x.shape
    x = x.clone().view(-1, group)
    idx = x.abs().topk(2, dim=-1).indices
    top = torch.gather(x, 1, idx)
    rows = torch.arange(0, x.size(0))[:, None].expand(-1, 2)
    x[rows, idx] = 0
    scale = x.abs().max(dim=-1).values.clamp_min(1e-6)
    x *= (2 ** (4 - 1) - 1) / scale[:, None]
    if noise is not None:
        x += noise.view(-1, group)
    q = x.round().clamp(-2 ** (4 - 1), 2 ** (4 - 1) - 1)
    out = q * scale[:, None] / (2 ** (4 - 1) - 1)
    out[rows, idx] = top
    return out.view(shape), q.view(shape), scale, top, idx


def codes(q):
    """Signed / unsigned integer codes from a QTensor's packed nibbles."""
    c = torch.stack([q.data & 0xF, q.data >> 4], -1).flatten(-2).to(torch.int32)
    return torch.where(c >= 8, c - 16, c) if q.fmt.name == "int4_act" else c


def same_bits(a, b):
    a, b = a.contiguous(), b.contiguous()
    return a.shape == b.shape and torch.equal(a.view(INT[a.element_size()]), b.view(INT[b.element_size()]))


def same_values(a, b):
    """Equal values, NaN where the other has NaN; a zero's sign aside (codes are integers, so a value that
    rounds to zero decodes as +0, where the official float code keeps round(-0.3) = -0)."""
    nan = torch.isnan(a)
    return a.shape == b.shape and torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def data(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape[:-1] + (1,), generator=g).float())
    x[..., ::7] *= 9  # heavier tails, so the kept values matter
    return x.to(dtype)


@pytest.mark.parametrize("shape,group", [((6, 512), 256), ((3, 5, 128), 64), ((4, 96), 32), ((2, 10), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_weight_matches_official(backend, shape, group, dtype, seed):
    x = data(shape, seed, dtype)
    q = lowbit.quantize(x, "int4_weight", block=(1, group), backend=backend)
    want, wq, s, z = official_weight(x.float(), group)
    assert same_values(q.dequantize(backend=backend), want)
    assert torch.equal(codes(q).reshape(-1), wq.reshape(-1).to(torch.int32))
    assert same_bits(q.scale[..., 0].reshape(-1), s.reshape(-1))
    assert torch.equal(q.scale[..., 1].reshape(-1), z.reshape(-1))  # the official zero point may be -0; ours is +0


@pytest.mark.parametrize("shape,group", [((6, 512), 256), ((3, 5, 128), 64), ((4, 96), 32), ((2, 10), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_act_matches_official(backend, shape, group, dtype, seed):
    x = data(shape, seed, dtype)
    q = lowbit.quantize(x, "int4_act", block=(1, group), backend=backend)
    want, wq, s, top, idx = official_act(x.float(), group)
    assert same_values(q.dequantize(backend=backend), want)
    assert torch.equal(codes(q).reshape(-1), wq.reshape(-1).to(torch.int32))
    rec = q.scale.reshape(-1, 5)
    assert same_bits(rec[:, 0], s) and same_bits(rec[:, 1:3], top) and torch.equal(rec[:, 3:].long(), idx)


def test_every_bf16_value(backend):
    """All 65536 bf16 bit patterns, finite ones in groups of 256 (in bit order and shuffled)."""
    allv = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = allv[torch.isfinite(allv)]
    finite = finite[: finite.numel() // 256 * 256]
    perm = torch.randperm(finite.numel(), generator=torch.Generator().manual_seed(0))
    for x in (finite.view(-1, 256), finite[perm].view(-1, 256)):
        got = lowbit.quantize(x, "int4_weight", backend=backend).dequantize(backend=backend)
        want = official_weight(x.float(), 256)[0]
        assert same_values(got, want)  # NaN where max - min overflows: an Inf scale
        got = lowbit.quantize(x, "int4_act", backend=backend).dequantize(backend=backend)
        assert same_values(got, official_act(x.float(), 256)[0])


def test_axis_and_layout(backend):
    """Groups run along `axis`; the rounding words follow the caller's flat index (inner > 1)."""
    x = data((3, 64, 5), 2)
    q = lowbit.quantize(x, "int4_act", block=(1, 32), axis=1, backend=backend)
    want = official_act(x.transpose(1, 2).contiguous(), 32)[0].transpose(1, 2)
    assert same_values(q.dequantize(backend=backend), want.contiguous())
    q = lowbit.quantize(x, "int4_act", block=(1, 32), axis=1, rounding="stochastic", seed=9, backend=backend)
    v = (x.transpose(1, 2).reshape(-1, 32)).clone()
    _, _, s, _, idx = official_act(x.transpose(1, 2).contiguous(), 32)
    v[torch.arange(v.shape[0])[:, None], idx] = 0
    t = 7 / s[:, None]
    v = (v * t).view(3, 5, 64).transpose(1, 2)  # back in the caller's layout
    got = codes(q)  # [3, 5, 64]: axis moved last
    for flat in (0, 1, 77, 300, 959):
        b, k, c = flat // 320, flat // 5 % 64, flat % 5
        val = float(v[b, k, c])
        n, frac = math.floor(abs(val)), abs(val) - math.floor(abs(val))
        m = n + (frac > (rounding_word(9, flat) >> 8) * 2.0**-24)
        assert got[b, c, k] == max(-8, min(7, int(math.copysign(m, val)))), flat


def test_stochastic_weight_rule(backend):
    """q = clamp(n + [frac > u] with the sign of w / s, + z): u from r(seed, i) of the spec."""
    x = data((4, 64), 3)
    q = lowbit.quantize(x, "int4_weight", block=(1, 32), rounding="stochastic", seed=2**40 + 5, backend=backend)
    _, _, s, z = official_weight(x, 32)
    v = (x.reshape(-1, 32) / s).reshape(-1)
    z = z.repeat_interleave(32).reshape(-1)
    got = codes(q).reshape(-1)
    for i in range(v.numel()):
        a = abs(float(v[i]))
        m = math.floor(a) + ((a - math.floor(a)) > (rounding_word(2**40 + 5, i) >> 8) * 2.0**-24)
        assert got[i] == max(0, min(15, int(math.copysign(m, float(v[i]))) + int(z[i]))), i


def test_stochastic_act_is_unbiased(backend):
    """E[q] = x * 7 / s for every element that is not kept: within 4 sigma over 4000 independent draws."""
    g = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    n = 4000
    q = lowbit.quantize(g.expand(n, 64), "int4_act", block=(1, 64), rounding="stochastic", seed=11, backend=backend)
    _, nearest, s, _, idx = official_act(g.clone(), 64)
    v = g[0] * (7 / s)
    mean = codes(q).double().mean(0)
    frac = (v - v.floor()).double()
    sigma = (frac * (1 - frac) / n).sqrt()
    keep = torch.ones(64, dtype=torch.bool)
    keep[idx[0]] = False
    assert torch.all((mean - v.double())[keep].abs() <= 4 * sigma[keep] + 1e-12)
    assert torch.all(codes(q)[:, ~keep] == 0)
    # every draw is one of the two neighbours, so the error is below one step
    assert torch.all((codes(q).double() - v.double())[:, keep].abs() < 1)


def test_official_noise_gives_the_same_distribution():
    """The official U(-0.5, 0.5) noise and the spec's Philox rule agree in mean (a sanity check of the transcription)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 64, generator=g).expand(4000, 64).contiguous()
    noise = torch.rand(x.shape, generator=g) - 0.5
    official = official_act(x, 64, noise)[1].double().mean(0)
    ours = codes(lowbit.quantize(x, "int4_act", block=(1, 64), rounding="stochastic", seed=1, backend="ref"))
    assert torch.allclose(official, ours.double().mean(0), atol=0.05)


def test_ties_zeros_and_specials(backend):
    x = torch.zeros(5, 8)
    x[0] = torch.tensor([1.0, -1.0, 0.5, 1.0, -1.0, 0.25, 0.0, 0.0])  # |x| ties: positions 0 then 1
    x[1] = -0.0
    x[2, 3] = math.nan
    x[3, 0] = math.inf
    x[4] = torch.tensor([0.0, 3.0, 0.0, 0.0, -3.0, 1.0, 2.0, 3.0])  # 3 at 1, 4 (as |x|) and 7: keep 1 and 4
    q = lowbit.quantize(x, "int4_act", block=(1, 8), backend=backend)
    rec = q.scale.reshape(5, 5)
    assert rec[0, 3:].tolist() == [0.0, 1.0] and rec[4, 3:].tolist() == [1.0, 4.0]
    d = q.dequantize(backend=backend)
    assert same_values(d[[0, 1, 4]], official_act(x[[0, 1, 4]], 8)[0])
    assert same_bits(d[1, :2], x[1, :2])  # kept values are exact, -0 included
    assert torch.isnan(d[2]).all() and torch.isnan(d[3]).all() and not torch.isnan(d[[0, 1, 4]]).any()
    assert same_bits(rec[2], torch.tensor([math.nan, math.nan, math.nan, 0.0, 1.0]))  # NaN = 0x7FC00000
    assert torch.all(codes(q)[2:4] == 0)
    w = lowbit.quantize(x[1:4], "int4_weight", block=(1, 8), backend=backend)
    assert same_bits(w.dequantize(backend=backend)[0], torch.zeros(8))
    assert torch.isnan(w.dequantize(backend=backend)[1:]).all() and torch.all(w.scale[1:, 0, 1] == 0)


def test_packing_and_shapes():
    x = torch.tensor([[-8.0, 7.0, -1.0, 0.0, 3.0, -3.0, 100.0, -100.0]])
    q = lowbit.quantize(x, "int4_act", block=(1, 8), backend="ref")
    # kept: 100 then -100 (a tie: the lower position first); s = 8, t = 7 / 8: codes -7, 6, -1, 0, 3, -3, 0, 0
    assert q.data.tolist() == [[0x69, 0x0F, 0xD3, 0x00]]
    assert q.scale.reshape(5).tolist() == [8.0, 100.0, -100.0, 6.0, 7.0]
    assert q.data.shape == (1, 4) and q.scale.shape == (1, 1, 5)
    w = lowbit.quantize(torch.randn(2, 3, 512), "int4_weight", backend="ref")
    assert w.data.shape == (2, 3, 256) and w.scale.shape == (6, 2, 2) and w.block == (1, 256)
    assert FORMATS["int4_weight"].scale_fields == 2 and FORMATS["int4_act"].scale_fields == 5
    e = lowbit.quantize(torch.empty(0, 512), "int4_act")
    assert e.scale.shape == (0, 2, 5) and e.dequantize().shape == (0, 512)


def test_argument_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="block"):
        lowbit.quantize(x, "int4_act", backend="ref")  # 64 is not a multiple of the default 256
    with pytest.raises(ValueError, match="block"):
        lowbit.quantize(x, "int4_act", block=(1, 1), backend="ref")
    with pytest.raises(ValueError, match="block"):
        lowbit.quantize(x, "int4_weight", block=(2, 32), backend="ref")
    with pytest.raises(ValueError, match="hadamard"):
        lowbit.quantize(x, "int4_weight", block=(1, 64), hadamard=16, backend="ref")
    with pytest.raises(ValueError, match="scale_mode"):
        lowbit.quantize(x, "int4_weight", block=(1, 64), scale_mode="floor", backend="ref")
    with pytest.raises(ValueError, match="t\\(\\)"):
        lowbit.quantize(x, "int4_weight", block=(1, 1), backend="ref").t()
    with pytest.raises(ValueError, match="rowwise.fmt"):
        lowbit.quantize_dual(x, lowbit.QuantizeSpec("int4_act", (1, 64)), lowbit.QuantizeSpec("mxfp8"))


def test_qmatmul_dequantizes(backend):
    a = lowbit.quantize(data((8, 256), 7), "int4_act", rounding="stochastic", seed=4, backend=backend)
    b = lowbit.quantize(data((16, 256), 8), "int4_weight", backend=backend)
    got = lowbit.qmatmul(a, b, backend=backend)
    want = a.dequantize(backend="ref") @ b.dequantize(backend="ref").t()
    assert same_bits(got, want)
