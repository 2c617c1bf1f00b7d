"""fused_linear_sft_loss / fused_linear_sequence_logps against the unfused path, and their peak memory."""
import pytest
import torch

from lowbit.objectives import (TensorMemoryTracker, fused_linear_sequence_logps, fused_linear_sft_loss,
                               fused_linear_token_logps, sequence_logps, sft_loss)

CASES = [
    ("nll", {}),
    ("neg_p", {}),
    ("f_alpha", {"alpha": 0.5}),
    ("threshold", {"tau": 0.01}),
    ("top_fraction", {"fraction": 0.3}),
    ("bottom_fraction", {"fraction": 0.3}),
    # The authors' keys: thresholds on p are decided per chunk, the family carries alpha in its name.
    ("OnlyTopP-0.01", {}),
    ("OnlyBottomP-0.05", {}),
    ("OnlyTopLogP-0.01", {}),
    ("OnlyBottomLogP-0.05", {}),
    ("GeneralFamily-4", {}),
]
IDS = [c[0] for c in CASES]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(n_tok=600, hidden=48, vocab=3001, seed=0, dtype=torch.float32, bias=False, batch=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tok, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 3).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n_tok,), generator=g)
    # Half the targets are the model's argmax so thresholds and top/bottom selections are non-trivial.
    with torch.no_grad():
        z = h.float() @ w.float().t()
    y[1::2] = z[1::2].argmax(-1)
    y[:: 7] = -100
    if batch:
        h, y = h.view(batch, -1, hidden), y.view(batch, -1)
    return h, w, b, y


def unfused(h, w, b, y, **kw):
    z = h @ w.t()
    if b is not None:
        z = z + b
    return sft_loss(z, y, **kw)


@pytest.mark.parametrize("objective,kw", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_matches_unfused(objective, kw, reduction):
    h, w, b, y = make(bias=True, batch=4)
    params = [t.requires_grad_(True) for t in (h, w, b)]
    ref = unfused(h, w, b, y, objective=objective, reduction=reduction, **kw)
    got = fused_linear_sft_loss(h, w, y, bias=b, objective=objective, reduction=reduction, chunk_size=97, **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert rel(got, ref) <= 1e-6
    # A non-trivial upstream gradient checks that backward scales by it.
    up = torch.rand_like(ref) + 0.5 if reduction == "none" else torch.tensor(1.7)
    g_ref = torch.autograd.grad(ref, params, up)
    g_got = torch.autograd.grad(got, params, up)
    for a, r in zip(g_got, g_ref):
        assert r.abs().max() > 0
        assert rel(a, r) <= 1e-6


@pytest.mark.parametrize("objective,kw", CASES, ids=IDS)
def test_fused_gradcheck_fp64(objective, kw):
    h, w, _, y = make(n_tok=10, hidden=3, vocab=6, dtype=torch.float64)
    h.requires_grad_(True)
    w.requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, c: fused_linear_sft_loss(a, c, y, objective=objective, reduction=reduction, chunk_size=3, **kw),
            (h, w), fast_mode=True)


def test_default_chunk_and_single_chunk_agree():
    h, w, _, y = make(n_tok=300)
    a = fused_linear_sft_loss(h, w, y, objective="neg_p")
    c = fused_linear_sft_loss(h, w, y, objective="neg_p", chunk_size=10 ** 6)
    assert rel(a, c) <= 1e-6


def test_bf16_inputs_fp32_math():
    h, w, _, y = make(n_tok=200, dtype=torch.bfloat16)
    h.requires_grad_(True)
    w.requires_grad_(True)
    got = fused_linear_sft_loss(h, w, y, objective="f_alpha", alpha=0.5, chunk_size=64)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = sft_loss(h32 @ w32.t(), y, objective="f_alpha", alpha=0.5)
    rh, rw = torch.autograd.grad(ref, (h32, w32))
    assert rel(got, ref) <= 1e-6
    # Only the final cast to bf16 separates the gradients from the fp32 reference.
    assert rel(gh.float(), rh) <= 4e-3 and rel(gw.float(), rw) <= 4e-3


def test_sequence_logps_fused_matches_unfused():
    h, w, b, y = make(n_tok=400, bias=True, batch=5)
    params = [t.requires_grad_(True) for t in (h, w, b)]
    z = h @ w.t() + b
    ref = sequence_logps(z, y)
    got = fused_linear_sequence_logps(h, w, y, bias=b, chunk_size=33)
    assert got.shape == (5,)
    assert rel(got, ref) <= 1e-6
    up = torch.randn(5)
    for a, r in zip(torch.autograd.grad(got, params, up), torch.autograd.grad(ref, params, up)):
        assert rel(a, r) <= 1e-6
    tok = fused_linear_token_logps(h, w, y, bias=b)
    assert torch.all(tok[y == -100] == 0)


def test_all_masked_fused():
    h, w, _, y = make(n_tok=50)
    h.requires_grad_(True)
    y[:] = -100
    with pytest.warns(RuntimeWarning, match="no token is kept"):
        loss = fused_linear_sft_loss(h, w, y, objective="neg_p")
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, h)
    assert torch.all(g == 0)


def test_no_grad_inputs_forward_only():
    h, w, _, y = make(n_tok=100)
    loss = fused_linear_sft_loss(h, w, y)
    assert not loss.requires_grad
    assert rel(loss, unfused(h, w, None, y)) <= 1e-6
    h.requires_grad_(True)
    with torch.no_grad():
        evaluated = fused_linear_sft_loss(h, w, y, objective="threshold")
    assert not evaluated.requires_grad
    assert rel(evaluated, unfused(h.detach(), w, None, y, objective="threshold")) <= 1e-6


def test_fused_bad_inputs():
    h, w, _, y = make(n_tok=20, vocab=30)
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_linear_sft_loss(h, w[:, :-1], y)
    with pytest.raises(ValueError, match="labels shape"):
        fused_linear_sft_loss(h, w, y[:-1])
    bad = y.clone()
    bad[0] = 30
    with pytest.raises(ValueError, match="labels must lie in"):
        fused_linear_sft_loss(h, w, bad)
    with pytest.raises(ValueError, match="unknown objective"):
        fused_linear_sft_loss(h, w, y, objective="focal")
    with pytest.raises(ValueError, match="tau"):
        fused_linear_sft_loss(h, w, y, objective="threshold", tau=1.0)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_sft_loss(h, w, y, bias=torch.zeros(29))
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_sft_loss(h.long(), w, y)


def _peak(fn):
    with TensorMemoryTracker() as t:
        fn()
    return t.peak


def test_tracker_counts_real_allocations():
    def f():
        a = torch.empty(1 << 20)      # 4 MiB
        b = torch.empty(1 << 20)      # 4 MiB, both alive
        del a, b
        c = torch.empty(1 << 19)      # 2 MiB after the others are freed
        c.mul_(2)                      # in place: no new storage
        return c.view(-1, 2)           # view: no new storage
    assert _peak(f) == 8 << 20


@pytest.mark.parametrize("objective,kw", [("nll", {}), ("top_fraction", {"fraction": 0.5})],
                         ids=["nll", "top_fraction"])
def test_fused_peak_memory_below_quarter_of_unfused(objective, kw):
    # Vocab 32k, 4k tokens: the unfused step holds full fp32 logits, log-softmax and their gradient.
    n_tok, hidden, vocab = 4096, 64, 32000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_tok, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) / 8).requires_grad_(True)
    y = torch.randint(0, vocab, (n_tok,), generator=g)

    def run_unfused():
        loss = sft_loss(h @ w.t(), y, objective=objective, **kw)
        loss.backward()

    def run_fused():
        loss = fused_linear_sft_loss(h, w, y, objective=objective, **kw)
        loss.backward()

    peak_unfused = _peak(run_unfused)
    grads_unfused = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    peak_fused = _peak(run_fused)
    logits_bytes = n_tok * vocab * 4
    assert peak_unfused >= 2 * logits_bytes  # sanity: the tracker sees the materialised logits
    assert peak_fused < peak_unfused / 4, (peak_fused / 2 ** 20, peak_unfused / 2 ** 20)
    assert rel(h.grad, grads_unfused[0]) <= 1e-6 and rel(w.grad, grads_unfused[1]) <= 1e-6
