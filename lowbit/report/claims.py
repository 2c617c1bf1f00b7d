"""The papers' claims, each judged on the pretraining runs that can speak to it.

Runs are grouped into cells (recipe, optimizer, condition); a cell's loss is the mean of its seeds'
final validation losses. A gap between two cells is judged against the bf16 AdamW seeds' standard
deviation sigma, as a two-sample difference: z = (mean_a - mean_b) / (sigma * sqrt(1/n_a + 1/n_b)).
That ignores the pairing by seed (same seed = same initialisation and data order), which would
shrink the noise, so it is conservative, and it alone gives the verdict. Beside it, for information:
the per-seed paired gaps and a paired z, mean(d) / (s_d / sqrt(n_pairs)), where d = a - b per seed
and s_d is the standard deviation of d pooled over every claim with at least two paired seeds (the
pairs are few, so one pooled estimate instead of one per claim).

A claim that one cell is worse (or better) than another is "reproduced" when |z| > k in the claimed
direction, "inside the noise" when |z| <= k, "contradicted" when |z| > k the other way. A claim that
two cells match ("tracks") is "reproduced" inside the noise, to the resolution the row states.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

REPRODUCED, NOISE, CONTRADICTED, MISSING = "reproduced", "inside the noise", "contradicted", "not run"

BF16_ADAMW = ("bf16", "adamw", "clean")
MERGED = ("bf16 constant LR + WSM merge", "adamw", "clean")


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str
    a: tuple[str, str, str]  # (recipe, optimizer, condition)
    b: tuple[str, str, str]
    expect: str  # "worse" | "better" (a than b, in loss) | "tracks" | "not worse"


def _c(recipe, opt="adamw", cond="clean"):
    return (recipe, opt, cond)


NV, SS, WSM = "NVFP4 pretraining", "Stable-SPAM", "WSM"
CLAIMS = [
    Claim(NV, "FP8 (tensor-wise) tracks BF16", _c("fp8-tensorwise"), BF16_ADAMW, "tracks"),
    Claim(NV, "MXFP8 tracks BF16", _c("mxfp8"), BF16_ADAMW, "tracks"),
    Claim(NV, "NVFP4 (RHT, SR, 2D weights) stays close to BF16", _c("nvfp4"), BF16_ADAMW, "tracks"),
    Claim(NV, "removing the RHT from NVFP4 costs loss", _c("nvfp4-no-rht"), _c("nvfp4"), "worse"),
    Claim(NV, "removing stochastic rounding from NVFP4 costs loss", _c("nvfp4-no-sr"), _c("nvfp4"), "worse"),
    Claim(NV, "MXFP4 is worse than NVFP4", _c("mxfp4"), _c("nvfp4"), "worse"),
    Claim(NV, "MXFP4 is worse than BF16", _c("mxfp4"), BF16_ADAMW, "worse"),
    Claim(SS, "INT4 training with Adam is worse than BF16 Adam", _c("int4"), BF16_ADAMW, "worse"),
    Claim(SS, "Stable-SPAM beats Adam in INT4 training", _c("int4", "stable_spam"), _c("int4"), "better"),
    Claim(SS, "Stable-SPAM beats Adam in MXFP4 training", _c("mxfp4", "stable_spam"), _c("mxfp4"), "better"),
    Claim(SS, "INT4 Stable-SPAM matches or beats BF16 Adam", _c("int4", "stable_spam"), BF16_ADAMW, "not worse"),
    Claim(SS, "MXFP4 Stable-SPAM matches or beats BF16 Adam", _c("mxfp4", "stable_spam"), BF16_ADAMW, "not worse"),
    Claim(SS, "control: Stable-SPAM closes the INT4 gap (INT4 Stable-SPAM tracks BF16 Stable-SPAM)",
          _c("int4", "stable_spam"), _c("bf16", "stable_spam"), "tracks"),
    Claim(SS, "control: Stable-SPAM closes the MXFP4 gap (MXFP4 Stable-SPAM tracks BF16 Stable-SPAM)",
          _c("mxfp4", "stable_spam"), _c("bf16", "stable_spam"), "tracks"),
    Claim(SS, "SPAM beats Adam in INT4 training with gradient spikes", _c("int4", "spam", "spikes"),
          _c("int4", "adamw", "spikes"), "better"),
    Claim(SS, "Stable-SPAM beats Adam in INT4 training with gradient spikes", _c("int4", "stable_spam", "spikes"),
          _c("int4", "adamw", "spikes"), "better"),
    Claim(SS, "Stable-SPAM beats SPAM in INT4 training with gradient spikes", _c("int4", "stable_spam", "spikes"),
          _c("int4", "spam", "spikes"), "better"),
    Claim(SS, "SPAM beats Adam in MXFP4 training with gradient spikes", _c("mxfp4", "spam", "spikes"),
          _c("mxfp4", "adamw", "spikes"), "better"),
    Claim(SS, "Stable-SPAM beats Adam in MXFP4 training with gradient spikes", _c("mxfp4", "stable_spam", "spikes"),
          _c("mxfp4", "adamw", "spikes"), "better"),
    Claim(SS, "Stable-SPAM beats SPAM in MXFP4 training with gradient spikes", _c("mxfp4", "stable_spam", "spikes"),
          _c("mxfp4", "spam", "spikes"), "better"),
    Claim(WSM, "a constant-LR run merged with WSM's weights matches or beats cosine decay at the same budget",
          MERGED, BF16_ADAMW, "not worse"),
]


def cells(runs) -> dict[tuple, dict[int, float]]:
    """{(recipe, optimizer, condition): {seed: final val loss}} of the finished pretraining runs."""
    out: dict[tuple, dict[int, float]] = {}
    for r in runs:
        sp = r.spec
        if sp.task != "pretrain" or sp.condition == "constant-lr" or not r.ok:
            continue
        out.setdefault((sp.recipe, sp.optimizer, sp.condition), {})[sp.seed] = r.val_loss
    return out


def verdict(z: float, expect: str, k: float) -> str:
    if math.isnan(z):
        return MISSING
    if expect == "tracks":
        return REPRODUCED if abs(z) <= k else CONTRADICTED
    if expect == "not worse":
        return CONTRADICTED if z > k else REPRODUCED
    sign = 1 if expect == "worse" else -1
    return REPRODUCED if sign * z > k else CONTRADICTED if sign * z < -k else NOISE


def judge(table: dict[tuple, dict[int, float]], sigma: float, k: float = 2.0, claims=CLAIMS) -> list[dict]:
    """One row per claim whose two cells both ran."""
    rows = []
    for c in claims:
        a, b = table.get(c.a), table.get(c.b)
        if not a or not b:
            continue
        ma, mb = statistics.fmean(a.values()), statistics.fmean(b.values())
        noise = sigma * math.sqrt(1 / len(a) + 1 / len(b)) if sigma and math.isfinite(sigma) else math.nan
        z = (ma - mb) / noise if noise and math.isfinite(noise) else math.nan
        paired = {s: (a[s] - b[s]) / b[s] for s in sorted(set(a) & set(b))}
        diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
        rows.append({"diffs": diffs, "paper": c.paper, "claim": c.text, "a": "/".join(c.a), "b": "/".join(c.b), "expect": c.expect,
                     "n_a": len(a), "n_b": len(b), "mean_a": ma, "mean_b": mb, "rel_gap": (ma - mb) / mb, "sigmas": z,
                     "resolution": k * noise / mb if math.isfinite(noise) else math.nan,
                     "paired_rel_gaps": paired, "verdict": verdict(z, c.expect, k)})
    s_d = pooled_paired_std([r["diffs"] for r in rows])
    for r in rows:
        d = r.pop("diffs")
        r["paired_z"] = statistics.fmean(d) / (s_d / math.sqrt(len(d))) if d and s_d and math.isfinite(s_d) \
            else math.nan
    return rows


def pooled_paired_std(groups: list[list[float]]) -> float:
    """The standard deviation of paired differences, pooled over the groups with two or more."""
    ss = sum(sum((x - statistics.fmean(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / dof) if dof else math.nan


def markdown(rows: list[dict], sigma: float, k: float) -> list[str]:
    if not rows:
        return []
    L = ["## Claims", "",
         f"Each claim compares two cells (recipe/optimizer/condition, the mean over their seeds). sigma = "
         f"{sigma:.4f}, the bf16 AdamW seeds' standard deviation; z = gap / (sigma sqrt(1/n_a + 1/n_b)); "
         f"|z| <= {k:g} is inside the noise. *Resolution* is the smallest relative gap this comparison could call "
         "(k times its noise). Paired gaps are (a - b) / b per seed both cells ran; paired z (information only, "
         "not the verdict) divides their mean by the pooled spread of paired differences.", "",
         "| paper | claim | a | b | n | gap | z | resolution | paired gaps by seed | paired z | verdict |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paired = ", ".join(f"s{s} {100 * g:+.2f} %" for s, g in r["paired_rel_gaps"].items()) or "-"
        L.append(f"| {r['paper']} | {r['claim']} | {r['a']} | {r['b']} | {r['n_a']} vs {r['n_b']} | "
                 f"{100 * r['rel_gap']:+.2f} % | {r['sigmas']:+.1f} | {100 * r['resolution']:.2f} % | {paired} | "
                 f"{r['paired_z']:+.1f} | **{r['verdict']}** |")
    L.append("")
    return L
