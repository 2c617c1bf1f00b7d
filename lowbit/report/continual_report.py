"""`lowbit report continual [--quick] [--steps N] [--methods ...] [--tasks ...] [--out DIR]`.

Runs `lowbit.report.continual` and writes ``README.md`` (summary table and, per method, the score of
every task after every stage), ``results.json`` (settings, every score, the summaries) and
``continual.png`` (accuracy and loss of each task across the stages, one column per method).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="report folder (default reports/continual; --quick: runs/report-continual-quick)")
    p.add_argument("--quick", action="store_true", help=f"a micro model and {CL.QUICK['steps']} steps per task: checks the "
                   "harness end to end in seconds (its numbers mean nothing)")
    return p


def settings_of(args) -> CL.Settings:
    s = CL.Settings(tasks=tuple(args.tasks), methods=tuple(args.methods), steps=args.steps, batch=args.batch,
                    hidden=args.hidden, layers=args.layers, lr=args.lr, classp_lr=args.classp_lr,
                    ewc_lambda=args.ewc_lambda, seed=args.seed)
    return dataclasses.replace(s, **CL.QUICK) if args.quick else s


# ---- markdown ------------------------------------------------------------------------------------------
def f2(v) -> str:
    return f"{v:.2f}"


def summary_table(res: dict) -> list[str]:
    rows = ["| method | final acc (mean) | plasticity acc | forgetting acc | final loss (mean) | plasticity loss "
            "| forgetting loss |", "|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        a, lo = r["summary"]["acc"], r["summary"]["loss"]
        rows.append(f"| {m} | {f2(a['mean_final'])} | {f2(a['mean_plasticity'])} | {f2(a['mean_forgetting'])} "
                    f"| {f2(lo['mean_final'])} | {f2(lo['mean_plasticity'])} | {f2(lo['mean_forgetting'])} |")
    return rows


def stage_table(r: dict, tasks: list[str]) -> list[str]:
    """Rows: after each stage; columns: each task's acc / loss (the current task in bold)."""
    rows = ["| after | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for i, stage in enumerate(r["scores"]):
        cells = []
        for j, t in enumerate(tasks):
            c = f"{f2(stage[t]['acc'])} / {f2(stage[t]['loss'])}"
            cells.append(f"**{c}**" if i == j else c)
        rows.append(f"| {i + 1}. {tasks[i]} | " + " | ".join(cells) + " |")
    a, lo = r["summary"]["acc"], r["summary"]["loss"]
    rows.append("| forgetting | " + " | ".join(f"{f2(x)} / {f2(y)}" for x, y in zip(a["forgetting"], lo["forgetting"]))
                + " | - |")
    return rows


def markdown(res: dict, meta: dict) -> str:
    s = res["settings"]
    tasks = list(s["tasks"])
    lines = ["# Continual learning: AdamW vs EWC vs CLASSP", "",
             f"`{meta['command']}` on {meta['machine']}, {meta['wall_time_s']:.0f} s.", "",
             f"Tasks in order: {', '.join(tasks)} ({s['steps']} steps of {s['batch']} examples each); a Llama of "
             f"hidden size {s['hidden']}, {s['layers']} layer(s), character-level; AdamW / EWC lr {s['lr']}, "
             f"EWC lambda {s['ewc_lambda']}, CLASSP lr {s['classp_lr'] or 'default'}. Held-out: {s['val_examples']} "
             "examples per task.", "",
             "acc: fraction of held-out answers right at every token (greedy decoding's exact match); loss: mean "
             "answer-token loss. Plasticity: the score on a task right after learning it; forgetting: its best score "
             "before the last stage minus its final score (loss: final minus best; positive = forgot).", "",
             "## Summary", ""] + summary_table(res) + ["", f"Expected: {PAPER}", ""]
    for m, r in res["methods"].items():
        lines += [f"## {m}", "", "acc / loss of every task after each stage (bold: the task just learned)", ""]
        lines += stage_table(r, tasks) + [""]
    lines += ["![accuracy and loss across stages](continual.png)", ""]
    return "\n".join(lines)


# ---- plot ----------------------------------------------------------------------------------------------
def plot(path: Path, res: dict) -> str:
    try:
        plt = _plt()
    except ImportError:
        return f"matplotlib is not installed: {path.name} not written"
    tasks = list(res["settings"]["tasks"])
    methods = list(res["methods"])
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.5), squeeze=False)
    x = list(range(1, len(tasks) + 1))
    for col, m in enumerate(methods):
        scores = res["methods"][m]["scores"]
        for row, key in enumerate(("acc", "loss")):
            ax = axes[row][col]
            for j, t in enumerate(tasks):
                ax.plot(x, [st[t][key] for st in scores], marker="o", color=f"C{j}", label=t)
                ax.axvline(j + 1, color=f"C{j}", alpha=0.12, lw=6)  # where task j is trained
            ax.set_xticks(x)
            ax.set_xticklabels([f"after\n{t}" for t in tasks], fontsize=8)
            ax.set_ylabel("held-out accuracy" if key == "acc" else "held-out answer loss")
            if key == "acc":
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(m if row == 0 else "", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7, title="task", title_fontsize=7)
    fig.suptitle("continual learning: every task after each stage", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path.name}"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    s = settings_of(args)
    out = Path(args.out or ("runs/report-continual-quick" if args.quick else "reports/continual"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = CL.run(s, say=lambda text: print(text, flush=True))
    meta = {"command": "lowbit report continual " + " ".join(shlex.quote(a) for a in argv),
            "machine": machine_name("cpu"), "wall_time_s": time.time() - t0}
    (out / "README.md").write_text(markdown(res, meta))
    with open(out / "results.json", "w") as f:
        json.dump(res | {"meta": meta}, f, indent=1)
    note = plot(out / "continual.png", res)
    print(f"wrote {out / 'README.md'}, results.json; {note}")
    return 0
