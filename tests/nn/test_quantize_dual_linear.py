"""The quantized Linear quantizes x, dy and W along both of their dims with one `quantize_dual` call each,
and gets exactly the bits it got from two `quantize` calls: the output, every gradient, and the
random stream after the step (so the seeds are drawn as before)."""
import os

import pytest
import torch

import lowbit
from lowbit.nn import functional as F
from lowbit.nn.recipe import RECIPES

QUANTIZED = [name for name, r in RECIPES.items() if r.quantizes and r.wgrad_input is not None]  # int4: fprop only
# quantize_dual calls per forward + backward: x, dy, W, less the tensors whose second layout is the
# first transposed (tensor-wise / square tiles) or whose fprop input is clamped first (fp4-dge)
DUAL_CALLS = {"fp8-tensorwise": 0, "fp8-rowwise": 3, "fp8-blockwise": 2, "mxfp8": 3, "mxfp4": 3, "nvfp4": 3,
              "fp4-dge": 2}
INT = {2: torch.int16, 4: torch.int32}


def two_calls(x, rowwise, colwise, backend=None):
    """What nn.functional did before quantize_dual: quantize(pad_rows(x)) and quantize(pad_cols(x.t()))."""
    def q(t, s):
        return lowbit.quantize(t, s.fmt, block=s.block, rounding=s.rounding, seed=s.seed, scale_mode=s.scale_mode,
                               hadamard=s.hadamard, backend=backend)
    return q(F.pad_rows(x, rowwise.pad), rowwise), q(F.pad_cols(x.t(), colwise.pad), colwise)


def step(name, dtype, grads=("x", "w")):
    recipe = RECIPES[name]
    fin, fout = (128, 128) if name == "fp8-blockwise" else (64, 32)
    torch.manual_seed(0)
    x = torch.randn(20, fin).to(dtype).requires_grad_("x" in grads)
    w = (torch.randn(fout, fin) * 0.1).to(dtype).requires_grad_("w" in grads)
    b = torch.randn(fout).to(dtype).requires_grad_()
    wq = F.quantize_weight(w.detach(), recipe)
    y = F.LowBitLinearFunction.apply(x, w, b, recipe, wq, dtype)
    y.backward(torch.randn_like(y))
    outs = [y, b.grad] + [t.grad for t, g in ((x, "x"), (w, "w")) if g in grads]
    return [t.detach().contiguous().view(INT[t.element_size()]) for t in outs] + [torch.randint(0, 2**62, (4,))]


def compare(monkeypatch, name, dtype, grads=("x", "w"), dual_backend=None):
    calls = []

    def fused(x, row, col):
        calls.append(1)
        return lowbit.quantize_dual(x, row, col, backend=dual_backend)
    monkeypatch.setattr(F, "quantize_dual", fused)
    got = step(name, dtype, grads)
    monkeypatch.setattr(F, "quantize_dual", lambda x, row, col: two_calls(x, row, col, "ref" if dual_backend else None))
    want = step(name, dtype, grads)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{name} {dtype}: output {i} differs in {int((a != b).sum())} places"
    return len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", QUANTIZED)
def test_same_bits_as_two_quantize_calls(monkeypatch, name, dtype):
    assert compare(monkeypatch, name, dtype) == DUAL_CALLS[name]


@pytest.mark.parametrize("grads,calls", [(("x",), 2), (("w",), 2), ((), 2)])
def test_backward_without_one_gradient(monkeypatch, grads, calls):
    """dy is quantized once per layout only when both dgrad and wgrad run; otherwise as before."""
    assert compare(monkeypatch, "nvfp4", torch.float32, grads) == calls


@pytest.mark.triton
@pytest.mark.parametrize("name", ["fp8-rowwise", "mxfp4", "nvfp4", "fp4-dge"])
def test_fused_triton_kernels_in_the_layer(monkeypatch, name):
    """The Triton quantize_dual (interpreted on CPU without a GPU) inside the layer, against ref's two calls."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    if torch.cuda.is_available():
        pytest.skip("the layer runs on CPU tensors here; the kernels are checked on CUDA in tests/ops")
    assert compare(monkeypatch, name, torch.bfloat16, dual_backend="triton") == DUAL_CALLS[name]
