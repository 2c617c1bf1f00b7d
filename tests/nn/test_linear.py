"""LowBitLinear numerics: exactness of the bf16 recipe, per-recipe error floors, RHT, SR, DGE, outliers."""
import dataclasses

import pytest
import torch

import lowbit
import lowbit.nn as N
from lowbit.nn.dge import dge_derivative_of_scaled
from lowbit.nn.outliers import clamp_outliers
from lowbit.nn.recipe import Operand


def sqnr(approx, exact):
    exact = exact.double()
    return (10 * torch.log10(exact.pow(2).sum() / (approx.double() - exact).pow(2).sum())).item()


def grads(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return (y, *torch.autograd.grad(y, [x] + params, dy))


def test_bf16_recipe_is_nn_linear_exactly():
    torch.manual_seed(0)
    ref = torch.nn.Linear(96, 40)
    low = N.LowBitLinear(96, 40, recipe="bf16")
    low.load_state_dict(ref.state_dict())
    x, dy = torch.randn(3, 7, 96), torch.randn(3, 7, 40)
    for a, b in zip(grads(low, x, dy), grads(ref, x, dy)):
        assert torch.equal(a, b)


def test_state_dict_is_nn_linears():
    low = N.LowBitLinear(64, 32, recipe="nvfp4")
    ref = torch.nn.Linear(64, 32)
    assert {k: v.shape for k, v in low.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(low.state_dict())
    low.load_state_dict(ref.state_dict())


# Floors in dB against fp64, for x ~ N(0,1) [256, 512], dy ~ N(0,1), nn.Linear's init, T = 256 tokens.
# A GEMM of two operands quantized with independent errors has SQNR -10 log10(10^-a/10 + 10^-b/10):
# both operands at the format's tensor SQNR (DESIGN: E4M3 31.6, E5M2 25.6, MXFP8 30.7, MXFP4 18.8,
# NVFP4 1x16 RTN 20.4, 16x16 19.1, 1x16 SR 17.3) predicts the measured values to 0.2 dB; each floor is
# the measured value (4 seeds) minus 0.5 dB.
FLOORS = {  # (y, dx, dW)
    "fp8-tensorwise": (28.1, 24.1, 24.1),   # E4M3 x E4M3; E5M2 gradients in dgrad and wgrad
    "fp8-rowwise": (28.2, 28.2, 28.1),
    "fp8-blockwise": (28.3, 28.3, 28.2),
    "mxfp8": (27.4, 27.4, 27.1),
    "mxfp4": (15.1, 15.2, 15.3),
    "nvfp4": (16.2, 14.5, 15.0),             # dgrad: SR 1x16 gradient x 16x16 weight; wgrad: SR + RHT
    "fp4-dge": (16.3, 24.2, None),           # FP4 forward, FP8 backward; DGE changes dW on purpose (see below)
}


@pytest.mark.parametrize("name", list(FLOORS))
@pytest.mark.parametrize("tokens", [256, 37])
def test_sqnr_floors(name, tokens):
    torch.manual_seed(1)
    layer = N.LowBitLinear(512, 256, bias=False, recipe=name)
    x, dy = torch.randn(tokens, 512), torch.randn(tokens, 256)
    y, dx, dw = grads(layer, x, dy)
    w = layer.weight.detach().double()
    got = (sqnr(y, x.double() @ w.t()), sqnr(dx, dy.double() @ w), sqnr(dw, dy.double().t() @ x.double()))
    # 37 tokens (not a multiple of any token block: zero-padded) have fewer samples, so allow 1 dB more spread
    slack = 0.0 if tokens == 256 else 1.0
    for what, g, floor in zip(("y", "dx", "dW"), got, FLOORS[name]):
        if floor is not None:
            assert g >= floor - slack, f"{name} {what}: {g:.2f} dB < floor {floor}"


def test_conv1d_layout_is_the_same_layer():
    torch.manual_seed(2)
    a = N.LowBitLinear(64, 48, recipe="nvfp4")
    b = N.LowBitLinear(64, 48, recipe="nvfp4", transposed_weight=True)
    with torch.no_grad():
        b.weight.copy_(a.weight.t())
        b.bias.copy_(a.bias)
    x, dy = torch.randn(20, 64), torch.randn(20, 48)
    torch.manual_seed(3)
    ya, dxa, dwa, dba = grads(a, x, dy)
    torch.manual_seed(3)
    yb, dxb, dwb, dbb = grads(b, x, dy)
    assert torch.equal(ya, yb) and torch.equal(dxa, dxb) and torch.equal(dwa, dwb.t()) and torch.equal(dba, dbb)


def test_rht_leaves_the_wgrad_product_unchanged_in_exact_arithmetic():
    # The transform matrix, read off the op itself (entries are exactly +-1/4 for block 16).
    H = lowbit.hadamard(torch.eye(16), 16, seed=1234).double()
    assert torch.equal(H @ H.t(), torch.eye(16, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    dyt, xt = torch.randn(32, 64, generator=g).double(), torch.randn(48, 64, generator=g).double()
    Hb = torch.block_diag(*[H] * 4)  # 1 x 16 blocks along the 64 tokens
    assert torch.allclose((dyt @ Hb) @ (xt @ Hb).t(), dyt @ xt.t(), rtol=0, atol=1e-12)
    # and the layer applies the same transform to both operands: with quantization made (nearly)
    # lossless by a wide format, the RHT path still returns the plain wgrad
    wide = Operand("fp8_e4m3", "row")
    r = dataclasses.replace(N.RECIPES["fp8-rowwise"], wgrad_grad=dataclasses.replace(wide, hadamard=16),
                            wgrad_input=dataclasses.replace(wide, hadamard=16))
    layer = N.LowBitLinear(64, 32, bias=False, recipe=r)
    x, dy = torch.randn(64, 64), torch.randn(64, 32)
    _, _, dw = grads(layer, x, dy)
    assert sqnr(dw, dy.double().t() @ x.double()) > 27


def _nvfp4_wgrad_variants():
    nv = N.RECIPES["nvfp4"]
    return nv, dataclasses.replace(nv, wgrad_grad=Operand("nvfp4", (1, 16), "stochastic"),
                                   wgrad_input=Operand("nvfp4", (1, 16)))


def test_rht_wgrad_cost_on_heavy_tailed_gradients_is_bounded():
    """Measured, not hoped: on Student-t(2) gradients RHT-16 lowers NVFP4 wgrad SQNR against fp64
    (15.45 vs 16.38 dB over 6 seeds; also on i.i.d. normal, per-token scaled and spiky-token data,
    see DESIGN section 3). Its value is in training dynamics, judged by the convergence report; here
    we pin that the cost stays under 1.5 dB."""
    with_rht, without = _nvfp4_wgrad_variants()
    got = {}
    for name, r in (("rht", with_rht), ("plain", without)):
        vals = []
        for seed in range(3):
            torch.manual_seed(100 + seed)
            dy = torch.distributions.StudentT(2.0).sample((512, 128))
            x = torch.randn(512, 128)
            layer = N.LowBitLinear(128, 128, bias=False, recipe=r)
            vals.append(sqnr(grads(layer, x, dy)[2], dy.double().t() @ x.double()))
        got[name] = sum(vals) / len(vals)
    assert got["plain"] - 1.5 < got["rht"] < got["plain"] + 1.0, got


def test_stochastic_rounding_of_gradients_is_unbiased():
    """Mean of the SR wgrad over many draws converges to the product of the exact gradient with the
    (deterministically rounded) activation; one draw's error is sqrt(n) times larger."""
    _, r = _nvfp4_wgrad_variants()
    torch.manual_seed(5)
    layer = N.LowBitLinear(64, 32, bias=False, recipe=r)
    x, dy = torch.randn(64, 64), torch.randn(64, 32)
    qx = lowbit.quantize(x.t().contiguous(), "nvfp4", block=(1, 16)).dequantize().double()
    target = dy.double().t() @ qx.t()
    draws = torch.stack([grads(layer, x, dy)[2].double() for _ in range(256)])
    one = (draws[0] - target).norm()
    mean = (draws.mean(0) - target).norm()
    assert mean < one / 8, (mean, one)  # expected one / 16 for independent draws


def _dge_closed_form(v, k, clip):
    """The paper's f'(t) = |2t/d - 1|^(1/k - 1) / k per E2M1 interval, written out interval by interval."""
    levels = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    out = []
    for a in v.abs().tolist():
        i = max(j for j in range(7) if levels[j] <= a) if a < 6 else 6
        left, d = levels[i], levels[i + 1] - levels[i]
        u = abs(2 * (a - left) / d - 1)
        out.append(clip if u == 0 else min(u ** (1 / k - 1) / k, clip))  # the midpoint: infinite, clipped
    return torch.tensor(out, dtype=torch.float64)


def test_dge_derivative_matches_closed_form_and_the_smooth_function():
    v = torch.linspace(-7.5, 7.5, 3001)
    got = dge_derivative_of_scaled(v, 5.0, 3.0).double()
    assert torch.allclose(got, _dge_closed_form(v, 5.0, 3.0), rtol=1e-5, atol=0)
    # it is the derivative of f(t) = d/2 (1 + sign(2t/d - 1) |2t/d - 1|^(1/k)) away from the clip
    d, k, left = 1.0, 5.0, 2.0
    t = torch.tensor([0.05, 0.2, 0.8, 0.95], dtype=torch.float64)
    f = lambda t: d / 2 * (1 + torch.sign(2 * t / d - 1) * (2 * t / d - 1).abs() ** (1 / k))
    h = 1e-6
    fd = (f(t + h) - f(t - h)) / (2 * h)
    assert torch.allclose(dge_derivative_of_scaled((left + t).float(), k, 1e9).double(), fd, rtol=1e-4)
    # at grid points the derivative is 1/k; mean over an interval (unclipped) is 1
    assert dge_derivative_of_scaled(torch.tensor([0.0, 1.0, 4.0]), 5.0, 3.0).allclose(torch.full((3,), 0.2))


def test_dge_scales_the_straight_through_wgrad():
    torch.manual_seed(6)
    dge = N.RECIPES["fp4-dge"]
    ste = dataclasses.replace(dge, weight_estimator="ste")
    a, b = N.LowBitLinear(64, 32, recipe=dge), N.LowBitLinear(64, 32, recipe=ste)
    b.load_state_dict(a.state_dict())
    x, dy = torch.randn(48, 64), torch.randn(48, 32)
    _, dxa, dwa, dba = grads(a, x, dy)
    _, dxb, dwb, dbb = grads(b, x, dy)
    assert torch.equal(dxa, dxb) and torch.equal(dba, dbb)
    factor = N.dge_derivative(a.weight.detach(), a.quantized_weight().fprop)
    assert torch.equal(dwa, dwb * factor)
    assert 0.2 - 1e-6 <= factor.min() and factor.max() <= 3.0


def test_outlier_clamping_with_compensation():
    torch.manual_seed(7)
    r = N.RECIPES["fp4-dge"]
    layer = N.LowBitLinear(64, 32, bias=False, recipe=r)
    x = torch.randn(128, 64)
    x[torch.rand_like(x) < 0.01] *= 40  # outliers
    xc, res = clamp_outliers(x, 0.99)
    assert 0 < (res != 0).float().mean() <= 0.025  # about 2 (1 - q) of the entries
    y = layer(x)
    qw = layer.quantized_weight().fprop.dequantize().double()
    qxc = lowbit.quantize(xc, "nvfp4", block=(1, 16)).dequantize().double()
    # the clamped GEMM plus the sparse high-precision residual GEMM ...
    assert torch.allclose(y.double(), qxc @ qw.t() + res.double() @ qw.t(), rtol=1e-5, atol=1e-4)
    # ... equals the unclamped GEMM up to the quantization error of the clamped part only
    err = (y.double() - x.double() @ qw.t()).norm()
    assert torch.allclose(err, ((qxc - xc.double()) @ qw.t()).norm(), rtol=1e-4)
    uncompensated = dataclasses.replace(r, clamp_compensation=False)
    plain = dataclasses.replace(r, activation_clamp_quantile=None)
    errs = {}
    for name, rr in (("uncompensated", uncompensated), ("no clamp", plain)):
        other = N.LowBitLinear(64, 32, bias=False, recipe=rr)
        other.load_state_dict(layer.state_dict())
        errs[name] = (other(x).double() - x.double() @ qw.t()).norm()
    assert err < errs["no clamp"] < errs["uncompensated"], (err, errs)


def test_weight_cache_lives_for_one_optimizer_step():
    torch.manual_seed(8)
    layer = N.LowBitLinear(32, 32, recipe="mxfp8")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    first = layer.quantized_weight()
    for _ in range(3):  # gradient-accumulation micro-batches
        layer(torch.randn(4, 32)).sum().backward()
        assert layer.quantized_weight() is first
    opt.step()
    second = layer.quantized_weight()
    assert second is not first and not torch.equal(second.fprop.data, first.fprop.data)
    layer.load_state_dict({k: v + 1 for k, v in layer.state_dict().items()})
    assert layer.quantized_weight() is not second


def test_autocast_output_dtype_follows_autocast():
    layer = N.LowBitLinear(32, 16, recipe="fp8-tensorwise")
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x).to(torch.bfloat16))


def test_bf16_inputs_and_weights():
    layer = N.LowBitLinear(64, 32, recipe="nvfp4", dtype=torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(9)
    layer = N.LowBitLinear(64, 64, recipe="mxfp4")
    x = torch.randn(32, 64)
    g1 = torch.autograd.grad(layer(torch.relu(layer(x))).square().sum(), layer.weight)[0]
    g2 = torch.autograd.grad(checkpoint(lambda t: layer(torch.relu(layer(t))), x, use_reentrant=False).square().sum(),
                             layer.weight)[0]
    assert torch.equal(g1, g2)


def test_torch_compile_matches_eager():
    torch.manual_seed(10)
    layer = N.LowBitLinear(64, 32, recipe="fp8-rowwise")
    x = torch.randn(8, 64)
    compiled = torch.compile(layer)
    ye, dwe = grads(layer, x, torch.ones(8, 32))[0:3:2]
    yc, dwc = grads(compiled, x, torch.ones(8, 32))[0:3:2]
    assert torch.equal(ye, yc) and torch.equal(dwe, dwc)


def test_bad_input():
    with pytest.raises(ValueError, match="recipe: fp8-blockwise cannot run a Linear\\(100, 128\\)"):
        N.LowBitLinear(100, 128, recipe="fp8-blockwise")
    with pytest.raises(ValueError, match="in_features"):
        N.LowBitLinear(0, 4)
    with pytest.raises(ValueError, match="dgrad_grad: mxfp8.*reduction dim \\(16\\)"):
        N.LowBitLinear(32, 16, recipe="mxfp8")
    layer = N.LowBitLinear(32, 32, recipe="mxfp8")
    with pytest.raises(ValueError, match="x: expected last dim 32"):
        layer(torch.randn(4, 31))
    assert torch.equal(layer(torch.zeros(4, 32)), layer.bias.detach().expand(4, 32))  # an all-zero input is exact


@pytest.mark.parametrize("model_dtype,autocast,want", [
    (torch.float32, False, (torch.float32, torch.float32, torch.float32)),
    (torch.float32, True, (torch.bfloat16, torch.float32, torch.float32)),  # dx in x's dtype, dW in W's
    (torch.bfloat16, False, (torch.bfloat16, torch.bfloat16, torch.bfloat16)),
])
def test_gemms_write_the_output_dtype_of_the_run(monkeypatch, model_dtype, autocast, want):
    """fprop / dgrad / wgrad ask qmatmul for the dtype their result is used in (the GPU GEMM writes it
    directly; accumulation stays fp32), so a bf16 run never materialises fp32 GEMM outputs."""
    import lowbit.nn.functional as F

    seen = []
    real = F.qmatmul

    def spy(a, b, *, out_dtype=torch.float32, backend=None):
        seen.append(out_dtype)
        return real(a, b, out_dtype=out_dtype, backend=backend)

    monkeypatch.setattr(F, "qmatmul", spy)
    layer = N.LowBitLinear(64, 32, bias=False, recipe="fp8-rowwise", dtype=model_dtype)
    x = torch.randn(16, 64, dtype=model_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == want[0]
    assert seen == list(want)
    assert x.grad.dtype == model_dtype and layer.weight.grad.dtype == model_dtype
