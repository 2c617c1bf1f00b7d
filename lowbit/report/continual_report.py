"""`lowbit report continual [--quick] [--seeds N] [--steps N] [--methods ...] [--tasks ...] [--out DIR]`.

Runs `lowbit.report.continual` on N seeds and writes ``README.md`` (summary table, mean +- std over the
seeds; the paper's claims, each judged on the per-seed paired differences; per method, the mean score
of every task after every stage), ``results.json`` (settings, every seed's scores and summaries, the
statistics, the claims) and ``continual.png`` (accuracy and loss of each task across the stages, one
column per method: the mean over the seeds, each seed as a thin line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import time
from pathlib import Path

from ..machine import machine_name
from . import continual as CL
from .plots import _plt

PAPER = ("CLASSP paper (Ludwig, 2024): on sequences of tasks CLASSP forgets less than plain training and is "
         "competitive with EWC, while keeping the ability to learn each new task.")


def parser() -> argparse.ArgumentParser:
    d = CL.Settings()
    p = argparse.ArgumentParser(prog="lowbit report continual", description="continual learning: a tiny Llama learns "
                                "synthetic tasks one after another with AdamW, EWC and CLASSP; forgetting of the earlier "
                                "tasks and plasticity on the current one")
    p.add_argument("--tasks", nargs="+", choices=CL.TASKS, default=list(d.tasks), help="the sequence, in order")
    p.add_argument("--methods", nargs="+", choices=CL.METHODS, default=list(d.methods))
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per task (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW / EWC learning rate")
    p.add_argument("--classp-lr", type=float, default=d.classp_lr, help="CLASSP learning rate")
    p.add_argument("--ewc-lambda", type=float, default=d.ewc_lambda)
    p.add_argument("--seed", type=int, default=d.seed, help="the first seed")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"how many seeds, from --seed on (default {d.seeds}); "
                   "every method runs on each, and the claims pair them by seed")
    p.add_argument("--out", default=None, help="report folder (default reports/continual; --quick: runs/report-continual-quick)")
    p.add_argument("--quick", action="store_true", help=f"a micro model and {CL.QUICK['steps']} steps per task: checks the "
                   "harness end to end in seconds (its numbers mean nothing)")
    return p


def settings_of(args) -> CL.Settings:
    s = CL.Settings(tasks=tuple(args.tasks), methods=tuple(args.methods), steps=args.steps, batch=args.batch,
                    hidden=args.hidden, layers=args.layers, lr=args.lr, classp_lr=args.classp_lr,
                    ewc_lambda=args.ewc_lambda, seed=args.seed, seeds=args.seeds)
    return dataclasses.replace(s, **CL.QUICK) if args.quick else s


# ---- markdown ------------------------------------------------------------------------------------------
def f2(v) -> str:
    return f"{v:.2f}"


def pm(st: dict) -> str:
    """mean +- std over the seeds (the mean alone for one seed)."""
    return f2(st["mean"]) if st["n"] < 2 else f"{f2(st['mean'])} ± {f2(st['std'])}"


def summary_table(res: dict) -> list[str]:
    rows = ["| method | final acc (mean) | plasticity acc | forgetting acc | final loss (mean) | plasticity loss "
            "| forgetting loss |", "|---|---|---|---|---|---|---|"]
    for m, st in res["stats"].items():
        rows.append(f"| {m} | " + " | ".join(pm(st[k]) for k in CL.METRICS) + " |")
    return rows


def g(v: float, digits: int = 3) -> str:
    return "nan" if math.isnan(v) else f"{v:+.{digits}f}"


def claim_line(c: dict) -> str:
    """One claim: what it says, the per-seed paired differences, mean, se, z and the verdict."""
    metric = c["metric"].replace("_", " ")
    head = f"- ({c['label']}) {c['text']} [{metric}, {c['a']} − {c['b']}]"
    if c["verdict"] == CL.NOT_RUN:
        return f"{head}: **{CL.NOT_RUN}** ({c['a']} or {c['b']} not among the methods)"
    nums = f"per seed {', '.join(g(d) for d in c['diffs'])}; mean {g(c['mean'])}"
    if c["n"] < 2:
        return f"{head}: {nums}; one seed → **{CL.NO_NOISE}** (run --seeds 2 or more)"
    nums += f", se {c['se']:.3f}, z {g(c['z'], 2)}"
    v, k = c["verdict"], c["k"]
    if v == CL.NO_NOISE:
        return f"{head}: {nums} → **{v}** (every seed gives the same nonzero difference: se 0)"
    zero = " (every seed's difference is 0)" if c["se"] == 0 else ""
    if c["expect"] == "tracks":
        if v == CL.REPRODUCED:
            return (f"{head}: {nums} → **{v}**: |z| <= {k:g}, they agree to the resolution ±{k * c['se']:.3f} "
                    f"({k:g} se){zero}")
        side = "lower" if c["mean"] < 0 else "higher"
        return (f"{head}: {nums} → **{v}**: |z| > {k:g}, {c['a']} is {side} than {c['b']} "
                f"({c['a']} {CL.meaning(c['metric'], side)})")
    other = "higher" if c["expect"] == "lower" else "lower"
    want = f"{c['expect']} (z {'<' if c['expect'] == 'lower' else '>'} {'-' if c['expect'] == 'lower' else ''}{k:g})"
    why = {CL.REPRODUCED: f"{c['a']} {CL.meaning(c['metric'], c['expect'])}", CL.NOISE: f"|z| <= {k:g}{zero}",
           CL.CONTRADICTED: f"|z| > {k:g} the other way: {c['a']} {CL.meaning(c['metric'], other)}"}[v]
    return f"{head}: {nums} → **{v}** (claimed {want}; {why})"


def claims_section(res: dict) -> list[str]:
    n = len(res["seeds"])
    k = CL.K
    return (["## Claims", "", f"Expected: {PAPER}", "",
             f"Each line pairs the two methods seed by seed ({n} seed(s): {', '.join(map(str, res['seeds']))}; same "
             "seed = same initial weights, training data and held-out sets): d = A − B per seed, its mean, "
             f"se = std(d) / sqrt({n}) and z = mean / se. \"A is lower / higher than B\": |z| > {k:g} in the "
             f"claimed direction: reproduced; |z| <= {k:g}: inside the noise; |z| > {k:g} the other way: "
             f"contradicted. \"A tracks B\": |z| <= {k:g}: reproduced, to the resolution {k:g} se; else "
             "contradicted, with the direction. Lower forgetting = forgets less (acc and loss alike).", ""]
            + [claim_line(c) for c in res["claims"]] + [""])


def mean_scores(res: dict, method: str) -> list[dict]:
    """R[stage][task] = {"acc", "loss"}, the mean over the seeds."""
    runs = [r["methods"][method]["scores"] for r in res["runs"]]
    return [{t: {k: sum(sc[i][t][k] for sc in runs) / len(runs) for k in ("acc", "loss")} for t in runs[0][i]}
            for i in range(len(runs[0]))]


def mean_forgetting(res: dict, method: str, key: str) -> list[float]:
    per = [r["methods"][method]["summary"][key]["forgetting"] for r in res["runs"]]
    return [sum(col) / len(col) for col in zip(*per)]


def stage_table(res: dict, method: str, tasks: list[str]) -> list[str]:
    """Rows: after each stage; columns: each task's acc / loss, mean over the seeds (the current task in bold)."""
    rows = ["| after | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for i, stage in enumerate(mean_scores(res, method)):
        cells = []
        for j, t in enumerate(tasks):
            c = f"{f2(stage[t]['acc'])} / {f2(stage[t]['loss'])}"
            cells.append(f"**{c}**" if i == j else c)
        rows.append(f"| {i + 1}. {tasks[i]} | " + " | ".join(cells) + " |")
    fa, fl = mean_forgetting(res, method, "acc"), mean_forgetting(res, method, "loss")
    rows.append("| forgetting | " + " | ".join(f"{f2(x)} / {f2(y)}" for x, y in zip(fa, fl)) + " | - |")
    return rows


def markdown(res: dict, meta: dict) -> str:
    s = res["settings"]
    tasks = list(s["tasks"])
    n = len(res["seeds"])
    lines = ["# Continual learning: AdamW vs EWC vs CLASSP", "",
             f"`{meta['command']}` on {meta['machine']}, {meta['wall_time_s']:.0f} s.", "",
             f"Tasks in order: {', '.join(tasks)} ({s['steps']} steps of {s['batch']} examples each); a Llama of "
             f"hidden size {s['hidden']}, {s['layers']} layer(s), character-level; AdamW / EWC lr {s['lr']}, "
             f"EWC lambda {s['ewc_lambda']}, CLASSP lr {s['classp_lr'] or 'default'}. Held-out: {s['val_examples']} "
             f"examples per task. {n} seed(s): {', '.join(map(str, res['seeds']))}, every method on each.", "",
             "acc: fraction of held-out answers right at every token (greedy decoding's exact match); loss: mean "
             "answer-token loss. Plasticity: the score on a task right after learning it; forgetting: its best score "
             "before the last stage minus its final score (loss: final minus best; positive = forgot).", "",
             "## Summary", "", "Mean over the tasks of one run, then mean ± std (sample std) over the seeds.", ""]
    lines += summary_table(res) + [""] + claims_section(res)
    for m in res["stats"]:
        lines += [f"## {m}", "", f"acc / loss of every task after each stage, mean over the {n} seed(s) (bold: the "
                  "task just learned)", ""]
        lines += stage_table(res, m, tasks) + [""]
    lines += ["![accuracy and loss across stages](continual.png)", ""]
    return "\n".join(lines)


# ---- plot ----------------------------------------------------------------------------------------------
def plot(path: Path, res: dict) -> str:
    try:
        plt = _plt()
    except ImportError:
        return f"matplotlib is not installed: {path.name} not written"
    tasks = list(res["settings"]["tasks"])
    methods = list(res["stats"])
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.5), squeeze=False, sharey="row")
    x = list(range(1, len(tasks) + 1))
    for col, m in enumerate(methods):
        mean = mean_scores(res, m)
        for row, key in enumerate(("acc", "loss")):
            ax = axes[row][col]
            for j, t in enumerate(tasks):
                if len(res["runs"]) > 1:  # each seed, thin
                    for r in res["runs"]:
                        ax.plot(x, [st[t][key] for st in r["methods"][m]["scores"]], color=f"C{j}", lw=0.7,
                                alpha=0.3)
                ax.plot(x, [st[t][key] for st in mean], marker="o", color=f"C{j}", label=t)
                ax.axvline(j + 1, color=f"C{j}", alpha=0.12, lw=6)  # where task j is trained
            ax.set_xticks(x)
            ax.set_xticklabels([f"after\n{t}" for t in tasks], fontsize=8)
            if col == 0:  # the rows share their y axis: the methods compare at a glance
                ax.set_ylabel("held-out accuracy" if key == "acc" else "held-out answer loss")
            if key == "acc":
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(m if row == 0 else "", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7, title="task", title_fontsize=7)
    n = len(res["runs"])
    fig.suptitle("continual learning: every task after each stage" + (f" (mean of {n} seeds; thin: each seed)"
                                                                      if n > 1 else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path.name}"


def json_safe(x):
    """nan (a std or se of one seed, a z without a noise estimate) -> null, so results.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected at least 1, got {args.seeds}")
    s = settings_of(args)
    out = Path(args.out or ("runs/report-continual-quick" if args.quick else "reports/continual"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = CL.run(s, say=lambda text: print(text, flush=True))
    meta = {"command": " ".join(["lowbit report continual"] + [shlex.quote(a) for a in argv]),
            "machine": machine_name("cpu"), "wall_time_s": time.time() - t0}
    (out / "README.md").write_text(markdown(res, meta))
    with open(out / "results.json", "w") as f:
        json.dump(json_safe(res | {"meta": meta}), f, indent=1, allow_nan=False)
    note = plot(out / "continual.png", res)
    print(f"wrote {out / 'README.md'}, results.json; {note}")
    return 0
