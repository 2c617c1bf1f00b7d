"""The KLDO paper's separation metric and its tests, on synthetic clusters and a tiny causal LM."""
import math

import numpy as np
import pytest
import torch

from lowbit.objectives import (bhattacharyya_distance, hidden_representations, prompt_separation, separation,
                               separation_regression, silhouette_score)
from lowbit.objectives.separation import _f_sf, _t_two_sided


def clusters(n_a=60, n_u=70, dim=16, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Anisotropic features so the PCA directions are well defined; the shift moves the unaligned cluster.
    scale = torch.linspace(2.0, 0.5, dim, dtype=torch.float64)
    a = torch.randn(n_a, dim, generator=g, dtype=torch.float64) * scale
    u = torch.randn(n_u, dim, generator=g, dtype=torch.float64) * scale
    u[:, 0] += shift
    return a, u


# ------------------------------------------------------------------------------------------ distributions
@pytest.mark.parametrize("t", [0.1, 1.0, 3.0, 12.7062])
def test_t_p_values_match_closed_forms(t):
    assert _t_two_sided(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
    assert _t_two_sided(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


def test_t_and_f_tables():
    assert _t_two_sided(2.228139, 10) == pytest.approx(0.05, rel=1e-5)   # t_{0.975, 10}
    assert _t_two_sided(1.959964, 1e7) == pytest.approx(0.05, rel=1e-4)  # normal limit
    for f, d2 in ((0.5, 7), (3.0, 20), (10.0, 97)):
        assert _f_sf(f, 2, d2) == pytest.approx((1 + 2 * f / d2) ** (-d2 / 2), rel=1e-10)
    assert _f_sf(4.964603, 1, 10) == pytest.approx(0.05, rel=1e-5)       # F_{0.95}(1, 10) = t^2


# ------------------------------------------------------------------------------------------------ metric
def authors_bd(x, y):
    """The authors' bhatta_dist.py formula with numpy."""
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cov = (cx + cy) / 2
    d = mx - my
    term2 = 0.5 * np.log(np.linalg.det(cov) / np.sqrt(np.linalg.det(cx) * np.linalg.det(cy)))
    return 0.125 * d @ np.linalg.inv(cov) @ d + term2


def brute_silhouette(x, lab):
    out = []
    for i in range(len(x)):
        d = np.sqrt(((x - x[i]) ** 2).sum(1))
        same = (lab == lab[i])
        if same.sum() == 1:
            out.append(0.0)
            continue
        a = d[same].sum() / (same.sum() - 1)
        b = min(d[lab == c].mean() for c in set(lab.tolist()) if c != lab[i])
        out.append((b - a) / max(a, b))
    return float(np.mean(out))


def test_metric_matches_the_authors_pipeline():
    a, u = clusters(shift=1.5)
    res = separation(a, u, test="none")
    # metrics.py: PCA(2) fitted on both sets, then BD and silhouette on the projection.
    x = np.concatenate([a.numpy(), u.numpy()])
    c = x - x.mean(0)
    proj = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
    pa, pu = proj[:60], proj[60:]
    assert res["bhattacharyya_distance"] == pytest.approx(authors_bd(pa, pu), rel=1e-9)
    assert res["bhattacharyya_coefficient"] == pytest.approx(math.exp(-authors_bd(pa, pu)), rel=1e-9)
    assert res["silhouette"] == pytest.approx(brute_silhouette(proj, np.r_[np.zeros(60), np.ones(70)]), rel=1e-9)
    assert res["centroid_distance"] == pytest.approx(float(np.linalg.norm(pa.mean(0) - pu.mean(0))), rel=1e-9)
    assert (res["n_aligned"], res["n_unaligned"], res["components"], res["test"]) == (60, 70, 2, "none")
    assert math.isnan(res["p_value"]) and res["significant"] is False
    full = separation(a, u, components=None, test="none")
    assert full["bhattacharyya_distance"] == pytest.approx(authors_bd(a.numpy(), u.numpy()), rel=1e-9)
    assert bhattacharyya_distance(a, u) == pytest.approx(full["bhattacharyya_distance"], rel=1e-12)


def test_silhouette_three_clusters_and_singletons():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64)
    lab = torch.tensor([0] * 6 + [1] * 6 + [2])
    assert silhouette_score(x, lab) == pytest.approx(brute_silhouette(x.numpy(), lab.numpy()), rel=1e-12)


@pytest.mark.parametrize("test", ["permutation", "hotelling"])
def test_separated_clusters_are_significant(test):
    a, u = clusters(shift=2.0, seed=2)
    res = separation(a, u, test=test, permutations=499, seed=0)
    assert res["significant"] and res["p_value"] <= 0.05
    if test == "permutation":
        assert res["p_value"] == pytest.approx(1 / 500)  # no permutation reaches the observed distance
        assert res["statistic"] == res["bhattacharyya_distance"] and res["permutations"] == 499


@pytest.mark.parametrize("test", ["permutation", "hotelling"])
def test_same_distribution_is_rejected_at_about_the_stated_level(test):
    # 100 datasets drawn under H0: rejections at level 0.05 ~ Binomial(100, 0.05); 13 or more has p < 0.002.
    # The permutation test is exact, Hotelling is exact for Gaussian data; both are deterministic given the seeds.
    rejections = sum(separation(*clusters(30, 34, dim=6, seed=100 + i), test=test, permutations=199,
                                seed=i)["significant"] for i in range(100))
    assert 1 <= rejections <= 12, rejections
    res = separation(*clusters(seed=7), test=test, permutations=199, level=0.05)
    assert not res["significant"] and res["p_value"] > 0.05


def test_permutation_p_value_is_deterministic_given_the_seed():
    a, u = clusters(shift=0.35, seed=3)
    p = [separation(a, u, permutations=299, seed=s)["p_value"] for s in (0, 0, 1, 2, 3)]
    assert p[0] == p[1] and 0 < p[0] < 1
    assert len(set(p)) > 1  # other seeds draw other permutations
    # The block size of the permutation loop must not change the stream of permutations.
    assert separation(a, u, permutations=1, seed=0)["p_value"] in (0.5, 1.0)


def test_hotelling_statistic():
    a, u = clusters(shift=0.5, seed=4)
    res = separation(a, u, test="hotelling")
    x = np.concatenate([a.numpy(), u.numpy()])
    c = x - x.mean(0)
    proj = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
    pa, pu = proj[:60], proj[60:]
    s = (59 * np.cov(pa, rowvar=False) + 69 * np.cov(pu, rowvar=False)) / 128
    d = pa.mean(0) - pu.mean(0)
    t2 = 60 * 70 / 130 * d @ np.linalg.solve(s, d)
    assert res["statistic"] == pytest.approx(t2, rel=1e-9)
    f = (130 - 2 - 1) / (2 * 128) * t2
    assert res["p_value"] == pytest.approx((1 + 2 * f / 127) ** (-127 / 2), rel=1e-8)


def test_separation_bad_inputs():
    a, u = clusters()
    with pytest.raises(ValueError, match="hidden_aligned has 16 features but hidden_unaligned has 15"):
        separation(a, u[:, :-1])
    with pytest.raises(ValueError, match="hidden_aligned needs more than 2 prompts"):
        separation(a[:2], u)
    with pytest.raises(ValueError, match="hidden_aligned must be 2-D"):
        separation(a[0], u)
    with pytest.raises(TypeError, match="hidden_unaligned"):
        separation(a, u.numpy())
    with pytest.raises(ValueError, match="NaN"):
        separation(a, u.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="test must be one of"):
        separation(a, u, test="bootstrap")
    with pytest.raises(ValueError, match="components"):
        separation(a, u, components=0)
    with pytest.raises(ValueError, match="permutations"):
        separation(a, u, permutations=0)
    with pytest.raises(ValueError, match="level"):
        separation(a, u, level=1.5)
    with pytest.raises(ValueError, match="span fewer"):
        separation(torch.ones(5, 4, dtype=torch.float64), torch.ones(5, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------------- the paper's test
def test_regression_across_models():
    bd = [0.2, 0.5, 1.1, 2.0, 3.5, 6.0]
    asr = [0.61, 0.52, 0.40, 0.37, 0.22, 0.15]
    res = separation_regression(bd, asr)
    x, y = np.log(bd), np.array(asr)
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    assert res["slope"] == pytest.approx(slope, rel=1e-10) and res["intercept"] == pytest.approx(intercept, rel=1e-10)
    assert res["correlation"] == pytest.approx(r, rel=1e-10) and res["r2"] == pytest.approx(r * r, rel=1e-10)
    assert res["t"] == pytest.approx(r * math.sqrt(4 / (1 - r * r)), rel=1e-9)  # the correlation t statistic
    assert res["p_value"] < 0.01 and res["slope"] < 0
    three = separation_regression([1.0, 2.0, 4.0], [0.5, 0.2, 0.3])  # 1 degree of freedom: closed form
    assert three["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(three["t"])), rel=1e-10)
    flat = separation_regression([1.0, 2.0, 3.0], [0.3, 0.3, 0.3], log_distance=False)
    assert flat["slope"] == 0.0 and flat["p_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3"):
        separation_regression([1.0, 2.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="attack_success_rates has 2"):
        separation_regression([1.0, 2.0, 3.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="> 0"):
        separation_regression([0.0, 2.0, 3.0], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------- representations
class EchoLM(torch.nn.Module):
    """hidden_states[l][b, t] = (l + 1) * [id, t]: shows which layer and position a pooling picked."""

    def __init__(self, layers=3):
        super().__init__()
        self.layers = layers
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        t = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        base = torch.stack([input_ids.float(), t.float()], -1)
        return type("Out", (), {"hidden_states": tuple(base * (l + 1) for l in range(self.layers + 1))})()


def test_pooling_picks_the_last_real_token_and_the_layer():
    m = EchoLM()
    seqs = [[5, 6, 7], [8], [9, 4]]
    last = hidden_representations(m, seqs, layer=2, batch_size=2)
    assert torch.equal(last, torch.tensor([[21.0, 6.0], [24.0, 0.0], [12.0, 3.0]]))
    mean = hidden_representations(m, seqs, layer=0, pooling="mean")
    assert torch.allclose(mean, torch.tensor([[6.0, 1.0], [8.0, 0.0], [6.5, 0.5]]))
    left = torch.tensor([[5, 6, 7], [0, 0, 8]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    assert torch.equal(hidden_representations(m, left, mask, layer=-1)[:, 0], torch.tensor([28.0, 32.0]))
    with pytest.raises(ValueError, match=r"layer must lie in \[-4, 4\)"):
        hidden_representations(m, seqs, layer=4)
    with pytest.raises(ValueError, match="pooling"):
        hidden_representations(m, seqs, pooling="cls")
    with pytest.raises(ValueError, match="empty sequence"):
        hidden_representations(m, [[1], []])
    with pytest.raises(ValueError, match="attention_mask shape"):
        hidden_representations(m, left, mask[:, :2])


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_batched_right_padding_equals_one_prompt_at_a_time():
    model = tiny_llama()
    seqs = [[3, 9, 4, 1, 7], [2, 8], [5, 5, 6]]
    for pooling in ("last", "mean"):
        got = hidden_representations(model, seqs, layer=1, pooling=pooling, batch_size=3)
        for i, s in enumerate(seqs):
            with torch.no_grad():
                h = model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[1][0]
            want = h[-1] if pooling == "last" else h.mean(0)
            assert torch.allclose(got[i], want, atol=1e-5), (pooling, i)


class CharTokenizer:
    chat_template = "user: {content}"

    def __init__(self):
        self.templated = []

    def apply_chat_template(self, messages, tokenize=False):
        assert not tokenize and messages[0]["role"] == "user"
        text = "<u>" + messages[0]["content"]
        self.templated.append(text)
        return text

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % 60 for c in text]}


def test_prompt_separation_end_to_end():
    model, tok = tiny_llama(), CharTokenizer()
    safe = [f"how do I bake bread number {i}" for i in range(12)]
    harmful = [f"zzzz qqqq xxxx {i} {'!' * (i % 4)}" for i in range(12)]
    res = prompt_separation(model, tok, safe, harmful, layer=-1, permutations=99, seed=3)
    assert len(tok.templated) == 24 and tok.templated[0] == "<u>" + safe[0]
    assert res["layer"] == -1 and res["pooling"] == "last" and res["permutations"] == 99
    assert res["n_aligned"] == res["n_unaligned"] == 12 and 0 < res["p_value"] <= 1
    again = prompt_separation(model, tok, safe, harmful, layer=-1, permutations=99, seed=3)
    assert again == res
    with pytest.raises(ValueError, match="unaligned_prompts"):
        prompt_separation(model, tok, safe, [], layer=1)
