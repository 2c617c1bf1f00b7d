"""Separation of safe and harmful prompts in a model's hidden space, from "LLM Safety Alignment is Divergence
Estimation in Disguise" (Haldar et al., arXiv:2502.00657, NeurIPS 2025; code github.com/rhaldarpurdue/KLDO).

The paper's metric, as its ``metrics.py`` computes it: take each prompt's hidden state at the last token
of the last layer, fit a 2-component PCA on the safe and harmful prompts together, and measure the two
projected clusters by the Bhattacharyya distance of Gaussian fits,
BD = 1/8 d' S^-1 d + 1/2 ln(det S / sqrt(det S1 det S2)) with d the mean difference, S1, S2 the
(unbiased) covariances and S = (S1 + S2) / 2, together with the Bhattacharyya coefficient exp(-BD) and
the silhouette score of the two clusters (Euclidean).

Two tests, for two questions:

* :func:`separation` tests one model: are its safe and harmful prompts separated beyond chance? The
  default is a label-permutation test of BD (the PCA is fitted on the pooled prompts, which a permutation
  leaves unchanged, so only BD is recomputed); ``test="hotelling"`` is the parametric two-sample
  Hotelling T^2 test of equal means on the same projection.
* :func:`separation_regression` is the paper's own significance claim: across aligned models, regress the
  attack success rate on log BD and test the slope (the authors' plot reports the correlation and the
  regression p-value).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

__all__ = ["separation", "bhattacharyya_distance", "silhouette_score", "separation_regression",
           "hidden_representations", "prompt_separation", "TESTS"]

TESTS = ("permutation", "hotelling", "none")


# --------------------------------------------------------------------------------------------- statistics
def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        # The fraction converges fast only below this point; use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return front * h / a


def _t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _f_sf(f: float, d1: float, d2: float) -> float:
    """P(F >= f) for the F(d1, d2) distribution."""
    return 1.0 if f <= 0 else _betainc(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))


# --------------------------------------------------------------------------------------------- the metric
def _check_hidden(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (prompts x features), got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (prompts x features), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to("cpu", torch.float64)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (..., d) and unbiased covariance (..., d, d) over the sample dimension -2."""
    mu = x.mean(-2)
    c = x - mu.unsqueeze(-2)
    return mu, c.transpose(-1, -2) @ c / (x.shape[-2] - 1)


def _bd(mu1, cov1, mu2, cov2) -> torch.Tensor:
    cov = (cov1 + cov2) / 2
    diff = (mu1 - mu2).unsqueeze(-1)
    maha = (diff.transpose(-1, -2) @ torch.linalg.solve(cov, diff)).squeeze(-1).squeeze(-1)
    logdet = torch.linalg.slogdet(cov)[1] - (torch.linalg.slogdet(cov1)[1] + torch.linalg.slogdet(cov2)[1]) / 2
    return maha / 8 + logdet / 2


def bhattacharyya_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Bhattacharyya distance between Gaussian fits (unbiased covariances) of the rows of ``x`` and ``y``."""
    x, y = _check_hidden("x", x), _check_hidden("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but y has {y.shape[1]}")
    for name, t in (("x", x), ("y", y)):
        if t.shape[0] <= t.shape[1]:
            raise ValueError(f"{name} needs more rows than features ({t.shape[1]}) for a full-rank covariance, "
                             f"got {t.shape[0]}")
    return float(_bd(*_moments(x), *_moments(y)))


def silhouette_score(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (Euclidean) of ``points`` (n, d) in the clusters given by integer ``labels`` (n,);
    a point alone in its cluster scores 0, as in scikit-learn."""
    x = _check_hidden("points", points)
    if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be a tensor of shape ({x.shape[0]},)")
    labels = labels.to("cpu")
    classes = labels.unique()
    if len(classes) < 2:
        raise ValueError("labels must contain at least 2 clusters")
    onehot = (labels[:, None] == classes[None, :]).double()  # (n, k)
    sizes = onehot.sum(0)
    sums = torch.zeros(x.shape[0], len(classes), dtype=torch.float64)
    for s in range(0, x.shape[0], 1024):  # row blocks keep the distance matrix small
        sums[s:s + 1024] = torch.cdist(x[s:s + 1024], x) @ onehot
    own = onehot.bool()
    own_size = onehot @ sizes
    a = sums[own] / (own_size - 1).clamp(min=1)
    b = (sums / sizes).masked_fill(own, float("inf")).min(1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where((own_size > 1) & (torch.maximum(a, b) > 0), s, torch.zeros_like(s))
    return float(s.mean())


def _project(x: torch.Tensor, components: int) -> torch.Tensor:
    """Rows of ``x`` on the top principal components of ``x`` itself (centred)."""
    c = x - x.mean(0)
    _, sv, vh = torch.linalg.svd(c, full_matrices=False)
    if sv.numel() < components or sv[components - 1] <= 1e-12 * max(float(sv[0]), 1e-300):
        raise ValueError(f"the hidden states span fewer than components={components} dimensions")
    return c @ vh[:components].T


def separation(hidden_aligned: torch.Tensor, hidden_unaligned: torch.Tensor, *, components: Optional[int] = 2,
               test: str = "permutation", permutations: int = 999, level: float = 0.05, seed: int = 0) -> dict:
    """The paper's separation metric for prompt representations (one row per prompt, e.g. from
    :func:`hidden_representations`) of aligned / safe and unaligned / harmful prompts, with a test.

    ``components``: PCA components fitted on both sets together (2 as in the paper; ``None`` keeps every
    feature, which needs more prompts per side than features). ``test``: ``"permutation"`` (H0: the two
    sets are exchangeable; p = (1 + #{BD_perm >= BD}) / (1 + permutations), deterministic given ``seed``),
    ``"hotelling"`` (two-sample T^2 on the projection, F-distributed under equal means and a shared
    Gaussian covariance) or ``"none"``. The separation is called significant when p <= ``level``.

    Returns a dict of floats / ints / str: ``bhattacharyya_distance``, ``bhattacharyya_coefficient``,
    ``silhouette``, ``centroid_distance`` (between the projected means), ``test``, ``statistic`` (BD for
    the permutation test, T^2 for Hotelling), ``p_value``, ``significant``, ``level``, ``permutations``,
    ``n_aligned``, ``n_unaligned``, ``components``, ``seed``.
    """
    a, u = _check_hidden("hidden_aligned", hidden_aligned), _check_hidden("hidden_unaligned", hidden_unaligned)
    if a.shape[1] != u.shape[1]:
        raise ValueError(f"hidden_aligned has {a.shape[1]} features but hidden_unaligned has {u.shape[1]}")
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    if components is not None and (isinstance(components, bool) or not isinstance(components, int)
                                   or not 1 <= components <= a.shape[1]):
        raise ValueError(f"components must be None or an int in [1, {a.shape[1]}], got {components!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive int, got {permutations!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    d = a.shape[1] if components is None else components
    for name, t in (("hidden_aligned", a), ("hidden_unaligned", u)):
        if t.shape[0] <= d:
            raise ValueError(f"{name} needs more than {d} prompts (one more than the dimensions compared), "
                             f"got {t.shape[0]}")
    n1, n = a.shape[0], a.shape[0] + u.shape[0]
    x = _project(torch.cat([a, u]), d) if components is not None else torch.cat([a, u])
    mu1, cov1 = _moments(x[:n1])
    mu2, cov2 = _moments(x[n1:])
    bd = float(_bd(mu1, cov1, mu2, cov2))
    labels = torch.cat([torch.zeros(n1, dtype=torch.long), torch.ones(n - n1, dtype=torch.long)])
    out = {"bhattacharyya_distance": bd, "bhattacharyya_coefficient": math.exp(-bd),
           "silhouette": silhouette_score(x, labels), "centroid_distance": float((mu1 - mu2).norm()),
           "test": test, "statistic": float("nan"), "p_value": float("nan"), "significant": False,
           "level": float(level), "permutations": 0, "n_aligned": n1, "n_unaligned": n - n1,
           "components": d, "seed": seed}
    if test == "permutation":
        gen = torch.Generator().manual_seed(seed)
        exceed = 0
        block = max(1, min(permutations, (1 << 24) // (n * d)))  # bounds the gathered copies to ~128 MiB
        for s in range(0, permutations, block):
            perm = torch.argsort(torch.rand(min(block, permutations - s), n, generator=gen), dim=1)
            xp = x[perm]  # (B, n, d)
            stat = _bd(*_moments(xp[:, :n1]), *_moments(xp[:, n1:]))
            # A split with a singular covariance scores +inf and counts as exceeding: conservative.
            exceed += int((stat >= bd).sum())
        p = (1 + exceed) / (1 + permutations)
        out.update(statistic=bd, p_value=p, permutations=permutations)
    elif test == "hotelling":
        pooled = ((n1 - 1) * cov1 + (n - n1 - 1) * cov2) / (n - 2)
        diff = (mu1 - mu2).unsqueeze(-1)
        t2 = float(n1 * (n - n1) / n * (diff.T @ torch.linalg.solve(pooled, diff)))
        if n - d - 1 < 1:
            raise ValueError(f"hotelling needs more prompts than {d + 1} in total beyond the dimensions, got {n}")
        f = (n - d - 1) / (d * (n - 2)) * t2
        out.update(statistic=t2, p_value=_f_sf(f, d, n - d - 1))
    if test != "none":
        out["significant"] = out["p_value"] <= level
    return out


def separation_regression(distances: Sequence[float], attack_success_rates: Sequence[float], *,
                          log_distance: bool = True) -> dict:
    """The paper's test across models: least-squares regression of attack success rate on (log) BD.

    One point per aligned model. Returns ``slope``, ``intercept``, ``correlation`` (Pearson r), ``r2``,
    ``t`` and ``p_value`` (two-sided t-test of slope = 0, n - 2 degrees of freedom) and ``n``. A negative
    significant slope says better-separated models are harder to jailbreak.
    """
    x = torch.as_tensor(distances, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(attack_success_rates, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"distances has {x.numel()} values but attack_success_rates has {y.numel()}")
    if x.numel() < 3:
        raise ValueError(f"distances needs at least 3 models for a regression test, got {x.numel()}")
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("distances and attack_success_rates must be finite")
    if log_distance:
        if bool((x <= 0).any()):
            raise ValueError("distances must be > 0 to take their log (or pass log_distance=False)")
        x = x.log()
    n = x.numel()
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    if sxx == 0:
        raise ValueError("distances are all equal: the slope is undefined")
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0
    resid = max(syy - slope * sxy, 0.0) / (n - 2)
    se = math.sqrt(resid / sxx)
    t = slope / se if se > 0 else math.copysign(math.inf, slope) if slope else 0.0
    p = 0.0 if math.isinf(t) else _t_two_sided(t, n - 2)
    return {"slope": slope, "intercept": float(y.mean()) - slope * float(x.mean()), "correlation": r,
            "r2": r * r, "t": t, "p_value": p, "n": n}


# ------------------------------------------------------------------------------------- representations
POOLINGS = ("last", "mean")


def _pad_right(seqs: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    lens = [len(s) for s in seqs]
    if min(lens) == 0:
        raise ValueError("input_ids contains an empty sequence")
    ids = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :lens[i]] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :lens[i]] = 1
    return ids, mask


@torch.no_grad()
def hidden_representations(model: torch.nn.Module, input_ids: Any, attention_mask: Optional[torch.Tensor] = None, *,
                           layer: int = -1, pooling: str = "last", batch_size: int = 16) -> torch.Tensor:
    """One vector per prompt from a Hugging Face causal LM: ``model(..., output_hidden_states=True)``'s
    ``hidden_states[layer]`` (0 is the embeddings, -1 the last layer, the paper's choice), pooled at the
    last non-padding token (``"last"``, the paper's choice) or averaged over the non-padding tokens
    (``"mean"``). Returns fp32 (prompts, hidden) on the CPU.

    ``input_ids``: a list of token-id sequences (padded on the right here; with causal attention the
    padding cannot change the kept positions) or a (N, T) tensor with ``attention_mask``. Left-padded
    tensors give the right last token, but models that derive positions from the sequence index (not the
    mask) then shift them; right padding or ``batch_size=1`` avoids that.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (prompts, tokens), got shape {tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if bool((mask.sum(1) == 0).any()):
            raise ValueError("attention_mask has a row with no tokens")
        ids = input_ids
    elif isinstance(input_ids, (list, tuple)) and len(input_ids) > 0:
        if attention_mask is not None:
            raise ValueError("attention_mask is only used with a tensor input_ids; sequences are padded here")
        ids, mask = _pad_right(input_ids)
    else:
        raise TypeError("input_ids must be a (N, T) tensor or a non-empty list of token-id sequences")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, ids.shape[0], batch_size):
            b_ids, b_mask = ids[s:s + batch_size].to(device), mask[s:s + batch_size].to(device)
            states = model(input_ids=b_ids, attention_mask=b_mask, output_hidden_states=True).hidden_states
            if not -len(states) <= layer < len(states):
                raise ValueError(f"layer must lie in [{-len(states)}, {len(states)}) for this model "
                                 f"({len(states) - 1} layers plus the embeddings at 0), got {layer}")
            h = states[layer].float()
            m = b_mask.to(h.dtype)
            if pooling == "last":
                # Index of the last non-padding token, whether the padding is on the left or the right.
                last = b_mask.shape[1] - 1 - b_mask.flip(1).long().argmax(1)
                out.append(h[torch.arange(h.shape[0], device=h.device), last].cpu())
            else:
                out.append(((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _tokenize_prompts(tokenizer, prompts: Sequence[str], chat_template: bool) -> list:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of str")
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    # As the authors' metrics.py: the chat-templated user turn as text, then tokenized as is.
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) if use_template else p
             for p in prompts]
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def prompt_separation(model: torch.nn.Module, tokenizer, aligned_prompts: Sequence[str],
                      unaligned_prompts: Sequence[str], *, layer: int = -1, pooling: str = "last",
                      chat_template: bool = True, batch_size: int = 16, **separation_kwargs) -> dict:
    """:func:`separation` of safe (``aligned_prompts``) and harmful (``unaligned_prompts``) prompts at
    ``layer``: each prompt is wrapped as a user turn by the tokenizer's chat template when it has one (and
    ``chat_template``), tokenized, and pooled by :func:`hidden_representations`. ``separation_kwargs`` go
    to :func:`separation` (``components``, ``test``, ``permutations``, ``level``, ``seed``); the result
    also records ``layer`` and ``pooling``."""
    for name, prompts in (("aligned_prompts", aligned_prompts), ("unaligned_prompts", unaligned_prompts)):
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"{name} must be a non-empty sequence of prompts")
    reps = [hidden_representations(model, _tokenize_prompts(tokenizer, prompts, chat_template), layer=layer,
                                   pooling=pooling, batch_size=batch_size)
            for prompts in (aligned_prompts, unaligned_prompts)]
    result = separation(reps[0], reps[1], **separation_kwargs)
    result.update(layer=layer, pooling=pooling)
    return result
