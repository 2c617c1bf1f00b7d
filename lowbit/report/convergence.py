"""`lowbit report convergence`: run the arms, judge gaps against seed noise, write markdown + PNGs.

Output in `out/`: `README.md` (the report), `results.json` (every run's summary and the verdicts),
`ladder.png`, `ladder_final.png`, `optim.png`, `sft.png`. Runs themselves go to `work/`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..machine import machine_name
from . import arms as A
from . import claims, merging, noise, plots, runner, sft_tasks, wgrad_noise

PAPER = {
    "ladder": "NVFP4 pretraining recipe paper: FP8 and MXFP8 track BF16; NVFP4 with RHT, SR and 2D weights stays "
              "close to BF16 while removing RHT or SR costs loss; MXFP4 is the worst of the ladder.",
    "optim": "Stable-SPAM paper: in 4-bit training Stable-SPAM reaches the lowest loss, SPAM is next and Adam is worst; "
             "the gap widens when gradients spike.",
    "merge": "WSM paper: merging the checkpoints of a constant-learning-rate run with decay-emulating weights "
             "matches or beats a run with learning-rate decay at the same token budget.",
    "sft": "Beyond Log Likelihood paper: probability-based objectives (-p, thresholded NLL) beat NLL when the model "
           "already has a strong prior on the task; NLL wins when the prior is weak.",
}


def fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.2f} %"


def analyse_ladder(res: dict[str, runner.Result], k: float) -> dict:
    runs = [r for r in res.values() if r.spec.arm == "ladder"]
    base = [r for r in runs if r.spec.group == A.BASELINE]
    if not base:
        return {}
    b = noise.band([r.val_loss for r in base if r.ok] or [math.nan])
    base_time = sum(r.summary.get("wall_time_s", math.nan) for r in base) / len(base)
    rows = []
    for r in runs:
        rows.append({"run": r.spec.name, "recipe": r.spec.group, "seed": r.spec.seed, "status": r.summary["status"],
                     "val_loss": r.val_loss, "rel_gap": noise.rel_gap(r.val_loss, b), "sigmas": noise.sigmas(r.val_loss, b),
                     "verdict": noise.verdict(r.val_loss, b, k) if r.spec.group != A.BASELINE else "baseline",
                     "wall_time_s": r.summary.get("wall_time_s"),
                     "time_vs_bf16": (r.summary.get("wall_time_s") or math.nan) / base_time})
    return {"band": asdict(b) | {"rel_std": b.rel_std}, "rows": rows}


def analyse_optim(res: dict[str, runner.Result], s: A.Settings, sigma: float | None, k: float) -> dict:
    """Per condition, every cell of the optim arm against its recipe's AdamW (seeds averaged; see `claims`)."""
    table = claims.cells(res.values())
    out = {}
    for cond in s.conditions:
        rows = []
        for recipe, o in A.cells(s):
            runs, ref = table.get((recipe, o, cond)), table.get((recipe, "adamw", cond))
            if not runs:
                continue
            mean = statistics.fmean(runs.values())
            row = {"cell": f"{recipe} {o}", "recipe": recipe, "optimizer": o, "n": len(runs), "val_loss": mean,
                   "gap_vs_adamw": math.nan, "sigmas": math.nan, "paired": {}, "verdict": "reference"}
            if o != "adamw" and ref:
                ref_mean = statistics.fmean(ref.values())
                row["gap_vs_adamw"] = (mean - ref_mean) / ref_mean
                noise_ = sigma * math.sqrt(1 / len(runs) + 1 / len(ref)) if sigma else math.nan
                row["sigmas"] = (mean - ref_mean) / noise_ if noise_ and math.isfinite(noise_) else math.nan
                row["paired"] = {sd: (runs[sd] - ref[sd]) / ref[sd] for sd in sorted(set(runs) & set(ref))}
                z = row["sigmas"]
                row["verdict"] = noise.NO_BAND if math.isnan(z) else noise.INDISTINGUISHABLE if abs(z) <= k \
                    else noise.BETTER if z < 0 else noise.WORSE
            rows.append(row)
        if rows:
            order = {r: [x["optimizer"] for x in sorted((x for x in rows if x["recipe"] == r), key=lambda x: x["val_loss"])]
                     for r in dict.fromkeys(x["recipe"] for x in rows)}
            out[cond] = {"rows": rows, "order": order}
    return out


def analyse_sft(res: dict[str, runner.Result], priors: dict, n_val: int, k: float) -> dict:
    runs = [r for r in res.values() if r.spec.arm == "sft"]
    out = {}
    for task in sft_tasks.TASKS:
        rs = [r for r in runs if r.spec.sft_task == task]
        if not rs:
            continue
        rows = []
        for r in rs:
            em = r.summary.get("val_exact_match")
            n = r.summary.get("val_examples") or None
            rows.append({"run": r.spec.name, "objective": r.spec.group.split()[1], "status": r.summary["status"],
                         "val_loss": r.val_loss, "val_exact_match": em, "n_val": n})
        nll = next((x for x in rows if x["objective"] == "nll"), None)
        for x in rows:
            x["loss_gap_vs_nll"] = (x["val_loss"] - nll["val_loss"]) / nll["val_loss"] if nll else math.nan
            x["em_gap_vs_nll"] = (x["val_exact_match"] - nll["val_exact_match"]) if nll and x["val_exact_match"] \
                is not None and nll["val_exact_match"] is not None else math.nan
            # the difference of two rates over the same n examples: sqrt(2) x one rate's standard error
            se = math.sqrt(2) * em_noise(nll["val_exact_match"] if nll else None, n_val)
            x["em_verdict"] = "reference" if x["objective"] == "nll" else (
                noise.NO_BAND if math.isnan(se) or math.isnan(x["em_gap_vs_nll"]) else
                noise.INDISTINGUISHABLE if abs(x["em_gap_vs_nll"]) <= k * se else
                noise.BETTER if x["em_gap_vs_nll"] > 0 else noise.WORSE)
        best_em = max(rows, key=lambda x: x["val_exact_match"] if x["val_exact_match"] is not None else -1)["objective"]
        best_loss = min(rows, key=lambda x: x["val_loss"] if math.isfinite(x["val_loss"]) else 1e9)["objective"]
        out[task] = {"prior_mean_prob": priors.get(task), "rows": rows, "best_exact_match": best_em,
                     "best_val_loss": best_loss}
    return out


def em_noise(p: float | None, n: int) -> float:
    """Binomial standard error of an exact-match rate over n held-out examples."""
    if p is None or n <= 0:
        return math.nan
    p = min(max(p, 0.5 / n), 1 - 0.5 / n)
    return math.sqrt(p * (1 - p) / n)


def markdown(s: A.Settings, an: dict, meta: dict, k: float) -> str:
    L = ["# Convergence report", "",
         f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, device {meta['device']}; "
         f"{meta['runs']} runs, {meta['wall_min']:.1f} min in total.  ",
         f"Model: Llama-style, hidden {s.hidden}, {s.layers} layers, {s.heads} heads, MLP {s.intermediate}, "
         f"{meta.get('parameters', '?')} parameters; data: lowbit's embedded corpus (stdlib source, BPE 4096), "
         f"sequence {s.seq_len}, batch {s.batch}; {s.steps} pretraining steps at lr {s.lr} (warm-up {s.warmup}, "
         "cosine)" + (f", {s.sft_steps} SFT steps at lr {s.sft_lr}" if an.get("sft") else "")
         + f"; validation loss over {s.eval_batches} batches. A seed sets the initial weights and the data order.", "",
         f"Noise rule: the baseline (bf16) runs with {s.baseline_seeds} seeds; a gap inside {k:g} standard "
         "deviations of those seeds is called **indistinguishable**, never a win or a loss. A standard "
         f"deviation from {s.baseline_seeds} seeds is itself uncertain (with 3 seeds the true value can be about "
         "twice the estimate), so only large gaps are conclusive at this scale.", ""]
    lad = an.get("ladder")
    only_baseline = bool(lad) and all(r["verdict"] == "baseline" for r in lad["rows"])
    if lad:
        b = lad["band"]
        L += (["## 1. Baseline", ""] if only_baseline else ["## 1. Recipe ladder", "", f"Paper: {PAPER['ladder']}", ""])
        L += [f"bf16 over {b['n']} seeds: mean {b['mean']:.4f}, std {fmt(b['std'])} "
              f"({fmt(100 * b['rel_std'], 2)} % of the mean), range {b['low']:.4f}-{b['high']:.4f}.", "",
              "| run | recipe | seed | final val loss | gap to bf16 mean | sigmas | verdict | wall time vs bf16 |",
              "|---|---|---|---|---|---|---|---|"]
        for r in lad["rows"]:
            L.append(f"| {r['run']} | {r['recipe']} | {r['seed']} | {fmt(r['val_loss'])} | {pct(r['rel_gap'])} | "
                     f"{fmt(r['sigmas'], 1)} | {r['verdict']} | {fmt(r['time_vs_bf16'], 2)}x |")
        L += ["", "![ladder loss curves](ladder.png)", "", "![ladder final losses](ladder_final.png)", ""]
        L += [] if only_baseline else [ladder_reading(lad, k), ""]
    opt = an.get("optim")
    if opt:
        L += ["## 2. 4-bit optimizer stability", "", f"Paper: {PAPER['optim']}", "",
              "Cells recipe/optimizer over seeds "
              f"{s.seed}..{s.seed + s.optim_seeds - 1} (the recipe on every block Linear: fprop, dgrad, wgrad), "
              "global-norm clipping at 1.0 as in every run. "
              + (f"Spikes: from step {s.spikes.start}, every {s.spikes.every} steps, {100 * s.spikes.fraction:g} % "
                 f"of each weight gradient's entries multiplied by {s.spikes.factor:g} (before clipping). "
                 if "spikes" in s.conditions else "")
              + "These runs use the loop of "
              "`lowbit/report/spikes.py`, which without spikes gives `lowbit.train.run`'s losses bit for bit "
              "(tests/report), so a clean AdamW cell reuses the ladder's runs. Gaps are to the same recipe's AdamW, "
              "judged against the bf16 seeds' std as the claims below are.", ""]
        for cond, d in opt.items():
            orders = "; ".join(f"{r}: {' < '.join(o)}" for r, o in d["order"].items())
            L += [f"**{cond}** (lowest loss first: {orders})", "",
                  "| cell | seeds | mean final val loss | gap vs AdamW | z | paired gaps | verdict |",
                  "|---|---|---|---|---|---|---|"]
            for r in d["rows"]:
                paired = ", ".join(f"s{sd} {100 * g:+.2f} %" for sd, g in r["paired"].items()) or "-"
                L.append(f"| {r['cell']} | {r['n']} | {fmt(r['val_loss'])} | {pct(r['gap_vs_adamw'])} | "
                         f"{fmt(r['sigmas'], 1)} | {paired} | {r['verdict']} |")
            L.append("")
        L += ["![optimizer loss curves](optim.png)", "", optim_reading(opt), ""]
    mer = an.get("merge")
    if mer:
        cos = mer["cosine_final"]
        L += ["## Checkpoint merging", "", f"Paper: {PAPER['merge']}", "",
              f"bf16 AdamW seed {s.seed} at a constant learning rate after the warm-up, checkpoints every "
              f"{A.merge_every(s)} steps; the last {len(mer['steps'])} (steps {mer['steps']}) merged "
              f"with WSM's cosine-emulating weights {[round(w, 3) for w in mer['weights']]} (`lowbit merge --weights "
              "wsm`). Scored by `lowbit eval` on the report's validation batches.", "",
              "| model | val loss |", "|---|---|",
              f"| constant LR, final step | {fmt(mer['constant_final'])} |",
              f"| constant LR + WSM merge | {fmt(mer['merged'])} |"]
        L += [f"| cosine decay, {name} | {fmt(v)} |" for name, v in cos.items()]
        L.append("")
    L += claims.markdown(an.get("claims", []), an.get("sigma") or math.nan, k)
    if an.get("wgrad"):
        L += wgrad_noise.markdown(an["wgrad"])
    sft = an.get("sft")
    if sft:
        L += ["## 3. SFT objectives across the prior continuum", "", f"Paper: {PAPER['sft']}", "",
              f"Base: the bf16 seed-{s.seed} pretrained checkpoint of arm 1. Tasks (`lowbit/report/sft_tasks.py`): "
              "*strong* = continue a window of the pretraining corpus, *weak* = the built-in sort/reverse/add chat "
              "task. Prior = mean probability of the response tokens under the base model. Exact match = every "
              "response token is the greedy argmax; its noise is the binomial standard error over the held-out "
              f"examples ({s.sft_val_examples}).", ""]
        for task, d in sft.items():
            L += [f"**{task} prior** (mean target probability {fmt(d['prior_mean_prob'])})", "",
                  "| run | objective | final val NLL (responses) | exact match | exact match vs nll | verdict | NLL vs nll |",
                  "|---|---|---|---|---|---|---|"]
            for r in d["rows"]:
                L.append(f"| {r['run']} | {r['objective']} | {fmt(r['val_loss'])} | {fmt(r['val_exact_match'], 3)} | "
                         f"{fmt(r['em_gap_vs_nll'], 3)} | {r['em_verdict']} | {pct(r['loss_gap_vs_nll'])} |")
            L.append("")
        L += ["![SFT loss curves](sft.png)", "", sft_reading(sft, k), ""]
    L += ["## Reproduce", "", "```", meta["command"], "```", "",
          "Runs are kept in the work folder; rerunning the command reuses finished runs of the same settings.", ""]
    return "\n".join(L)


def ladder_reading(lad: dict, k: float) -> str:
    rows = [r for r in lad["rows"] if r["verdict"] != "baseline"]
    ind = [r["recipe"] for r in rows if r["verdict"] == noise.INDISTINGUISHABLE]
    worse = [f"{r['recipe']} ({pct(r['rel_gap'])}, {fmt(r['sigmas'], 1)} sigma)" for r in rows if r["verdict"] == noise.WORSE]
    better = [f"{r['recipe']} ({pct(r['rel_gap'])})" for r in rows if r["verdict"] == noise.BETTER]
    out = [f"Reading: within {k:g} sigma of bf16 (indistinguishable): {', '.join(ind) or 'none'}."]
    if worse:
        out.append(f"Worse than bf16 beyond {k:g} sigma: {', '.join(worse)}.")
    if better:
        out.append(f"Lower loss than bf16 beyond {k:g} sigma (at this scale a seed effect, not a win): {', '.join(better)}.")
    nv = {r["recipe"]: r for r in rows if r["recipe"].startswith("nvfp4")}
    if "nvfp4" in nv and lad["band"]["std"] and math.isfinite(lad["band"]["std"]):
        parts = []
        for v in ("nvfp4-no-rht", "nvfp4-no-sr"):
            if v in nv:
                d = (nv[v]["val_loss"] - nv["nvfp4"]["val_loss"]) / lad["band"]["std"]
                call = "a cost as the paper reports" if d > k else "lower loss than the full recipe" if d < -k \
                    else "inside the noise"
                parts.append(f"{v} minus nvfp4 = {d:+.1f} sigma ({call})")
        if parts:
            out.append("NVFP4 ablations (paper: removing RHT or SR costs loss): " + "; ".join(parts) + ".")
    return " ".join(out)


def optim_reading(opt: dict) -> str:
    out = []
    paper = ["stable_spam", "spam", "adamw"]
    for cond, d in opt.items():
        for recipe, order in d["order"].items():
            got = [o for o in order if o in paper]
            if len(got) < 2:
                continue
            decided = [r for r in d["rows"] if r["recipe"] == recipe and r["verdict"] in (noise.BETTER, noise.WORSE)]
            want = [o for o in paper if o in got]
            state = "matches" if got == want else "differs from"
            out.append(f"{recipe} {cond}: observed order {' < '.join(got)} {state} the paper's {' < '.join(want)}"
                       + ("" if decided else ", but every gap to AdamW is inside the noise, so no ordering is "
                          "established") + ".")
    return "Reading: " + " ".join(out)


def sft_reading(sft: dict, k: float) -> str:
    """The crossover call: prob-based objectives beat nll on the strong prior, nll beats them on the weak one."""
    out = []
    calls = {}
    for task, d in sft.items():
        others = [r for r in d["rows"] if r["objective"] != "nll"]
        better = [r["objective"] for r in others if r["em_verdict"] == noise.BETTER]
        worse = [r["objective"] for r in others if r["em_verdict"] == noise.WORSE]
        calls[task] = (better, worse)
        out.append(f"{task} prior (mean target probability {fmt(d['prior_mean_prob'], 3)}): exact match above nll "
                   f"beyond {k:g} sigma: {', '.join(better) or 'none'}; below nll: {', '.join(worse) or 'none'}.")
    if set(calls) == {"strong", "weak"}:
        strong_ok, weak_ok = bool(calls["strong"][0]), bool(calls["weak"][1])
        if strong_ok and weak_ok:
            out.append("The paper's crossover is reproduced at this scale.")
        elif not any(calls["strong"]) and not any(calls["weak"]):
            out.append("The crossover is not resolved: every objective ties with nll within the noise.")
        else:
            out.append("The paper's crossover is not reproduced: "
                       + ("no probability-based objective beats nll on the strong prior" if not strong_ok else
                          "nll does not beat the probability-based objectives on the weak prior") + ".")
    out.append("Held-out NLL favours the nll objective by construction (it is what nll minimises), so exact match is "
               "the metric that can show the crossover.")
    return "Reading: " + " ".join(out)


def figures(out: Path, res: dict[str, runner.Result], an: dict) -> list[str]:
    notes = []

    def c(r):
        return {"train": r.train, "val": r.val}
    lad = [r for r in res.values() if r.spec.arm == "ladder"]
    if lad and an.get("ladder"):  # (an sft-only report pretrains its base without a ladder analysis)
        b = an["ladder"]["band"]
        notes.append(plots.curves(out / "ladder.png", "Recipe ladder (pretraining)",
                                  {"all recipes": {r.spec.name.removeprefix("ladder-"): c(r) for r in lad}}, band=b))
        finals = {r.spec.name.removeprefix("ladder-"): r.val_loss for r in lad if r.ok}
        if b.get("std") and math.isfinite(b["std"]):
            notes.append(plots.zoom_val(out / "ladder_final.png", "Final validation loss vs the bf16 seed band",
                                        finals, b))
    if an.get("optim"):
        panels = {}
        for cond, d in an["optim"].items():
            for recipe in d["order"]:
                panels[f"{recipe} {cond}"] = {f"{r.spec.optimizer} s{r.spec.seed}": c(r) for r in res.values()
                                              if r.spec.task == "pretrain" and r.spec.recipe == recipe
                                              and r.spec.condition == cond and r.spec.optimizer in d["order"][recipe]}
        per_row = max(len(d["order"]) for d in an["optim"].values())  # a row per condition
        notes.append(plots.curves(out / "optim.png", "optimizers by recipe, clean and with gradient spikes", panels,
                                  cols=per_row))
    sft = [r for r in res.values() if r.spec.arm == "sft"]
    if sft:
        # training losses of different objectives are on different scales: only the held-out NLL is drawn
        panels = {f"{t} prior": {r.spec.group.split()[1]: {"val": r.val} for r in sft if r.spec.sft_task == t}
                  for t in sft_tasks.TASKS}
        notes.append(plots.curves(out / "sft.png", "SFT objectives: held-out NLL of the responses",
                                  {k: v for k, v in panels.items() if v}, window=5))
    return notes


def report(s: A.Settings, arms: tuple[str, ...], work: str, out: str, command: str, k: float = 2.0,
           say=print) -> dict:
    """Run (or reuse) every run the arms need, then write the report. Returns the analysis."""
    t0 = time.time()
    specs = A.plan(s, arms)
    res: dict[str, runner.Result] = {}
    for i, spec in enumerate(specs, 1):
        say(f"[{i}/{len(specs)}] {spec.name}")
        res[spec.name] = runner.execute(spec, s, work, say)
        r = res[spec.name]
        say(f"  {r.summary['status']}: val loss {fmt(r.val_loss)} ({fmt(r.summary.get('wall_time_s'), 0)} s)")
    priors = {}
    if "sft" in arms:
        for task in sft_tasks.TASKS:
            spec = next(sp for sp in specs if sp.sft_task == task)
            priors[task] = sft_tasks.prior(runner.config_of(spec, s, work))
    an = {}
    if "ladder" in arms:
        an["ladder"] = analyse_ladder(res, k)
    sigma = an.get("ladder", {}).get("band", {}).get("std")
    sigma = sigma if sigma and math.isfinite(sigma) else None
    if "optim" in arms:
        an["optim"] = analyse_optim(res, s, sigma, k)
    table = claims.cells(res.values())
    if "merge" in arms:
        mspec = next(sp for sp in specs if sp.arm == "merge")
        cosine = [os.path.join(work, sp.name) for sp in specs if sp.arm == "ladder" and sp.recipe == A.BASELINE]
        an["merge"] = merging.evaluate(os.path.join(work, mspec.name), cosine, s, say)
        table[claims.MERGED] = {mspec.seed: an["merge"]["merged"]}
    an["sigma"] = sigma
    an["claims"] = claims.judge(table, sigma or math.nan, k)
    if "ladder" in arms and s.wgrad_draws and any(r.startswith("nvfp4") for r in s.recipes):
        say("wgrad estimator: bias and noise of one Linear's dW per recipe")
        an["wgrad"] = wgrad_noise.report(draws=s.wgrad_draws)
    if "sft" in arms:
        an["sft"] = analyse_sft(res, priors, s.sft_val_examples, k)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    params = next((r.summary.get("parameters") for r in res.values() if r.summary.get("parameters")), None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {"command": command, "machine": machine_name(device), "device": device, "runs": len(specs),
            "wall_min": sum(r.summary.get("wall_time_s") or 0 for r in res.values()) / 60,
            "elapsed_min": (time.time() - t0) / 60, "parameters": params}
    notes = figures(outp, res, an)
    (outp / "README.md").write_text(markdown(s, an, meta, k))
    with open(outp / "results.json", "w") as f:
        json.dump({"settings": asdict(s), "meta": meta, "analysis": an,
                   "runs": {n: r.summary for n, r in res.items()}}, f, indent=2, default=str)
    say(f"wrote {outp / 'README.md'}, results.json; " + "; ".join(notes))
    return an

