"""Block selection: every rule keeps the diagonal, nothing above it, and reaches its target."""
import torch

from lowbit.attention import by_density, by_threshold, by_topk, density
from lowbit.attention.selection import blocks_for_density, static_scores


def scores(n=16, seed=0):
    s = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(seed)).tril()
    return s / s.sum(-1, keepdim=True)


def causal_ok(mask):
    n = mask.shape[-1]
    return bool(mask.diagonal(dim1=-2, dim2=-1).all()) and not bool(mask.triu(1).any())


def test_threshold():
    s = scores()
    m = by_threshold(s, 0.1)
    assert causal_ok(m)
    eye = torch.eye(16, dtype=torch.bool)
    assert torch.equal(m & ~eye, (s > 0.1) & ~eye)


def test_topk():
    s = scores()
    m = by_topk(s, 3)
    assert causal_ok(m)
    assert torch.equal(m.sum(-1), torch.arange(1, 17).clamp(max=3).expand(2, 3, 16))
    # the non-diagonal picks are the best off-diagonal scores of their row
    row = s[0, 0, 10, :10]
    assert set(m[0, 0, 10, :10].nonzero().squeeze(1).tolist()) == set(row.topk(2).indices.tolist())


def test_density_hits_its_target():
    s = scores(n=64)
    for d in (0.1, 0.2, 0.5, 1.0):
        m = by_density(s, d)
        assert causal_ok(m)
        assert torch.equal(m.sum(-1)[0, 0], blocks_for_density(64, d))
        assert abs(density(m) - d) < 0.02  # per-row rounding to whole blocks; n = 64
    assert density(by_density(s, 1.0)) == 1.0


def test_static_pattern_is_sink_plus_window():
    m = by_density(static_scores(1, 1, 20), 0.25)[0, 0]
    i = 15
    k = int(blocks_for_density(20, 0.25)[i])
    want = {0} | set(range(i - k + 2, i + 1))
    assert set(m[i].nonzero().squeeze(1).tolist()) == want
