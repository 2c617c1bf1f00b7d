"""Run one `RunSpec` with `lowbit.train` and read back its summary and loss curves.

A run lives in `<work>/<spec.name>/`. A folder that already holds a finished run of the same
specification (`report_spec.json` equal, `summary.json` present) is reused, so an interrupted
report picks up where it stopped and a re-render costs nothing.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from ..train import load, run
from . import sft_tasks, spikes, variants
from .arms import RunSpec, Settings


@dataclass
class Result:
    spec: RunSpec
    summary: dict
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)

    @property
    def val_loss(self) -> float:
        v = self.summary.get("val_loss")
        return float(v) if v is not None else math.nan

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "completed" and math.isfinite(self.val_loss)


def curves(run_dir: str) -> tuple[list, list]:
    """(train, eval) curves from a run's metrics.jsonl."""
    train, val = [], []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return train, val
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("kind") == "train" and r.get("loss") is not None:
                train.append((int(r["step"]), float(r["loss"])))
            elif r.get("kind") == "eval" and r.get("val_loss") is not None:
                val.append((int(r["step"]), float(r["val_loss"])))
    return train, val


def config_of(spec: RunSpec, s: Settings, work: str):
    """The lowbit.train Config of a spec (recipe variants become YAML files under <work>/recipes)."""
    over = list(s.common()) + [f"run.dir={os.path.join(work, spec.name)}"]
    for o in spec.overrides:
        if o.startswith("quant.recipe="):
            o = "quant.recipe=" + variants.write(o.split("=", 1)[1], os.path.join(work, "recipes"))
        over.append(o)
    if spec.task == "sft":
        tr, va = task_files(s, work)[spec.sft_task]
        over += [f"model.init_from={os.path.join(work, spec.needs)}", f"data.train={tr}", f"data.validation={va}"]
    over += list(s.overrides)
    return load([], over, task=spec.task)


def task_files(s: Settings, work: str) -> dict[str, tuple[str, str]]:
    """The strong / weak prior SFT tasks, written once per work folder."""
    folder = os.path.join(work, "sft-data")
    marker = os.path.join(folder, "tasks.json")
    want = {"examples": s.sft_examples, "val": s.sft_val_examples, "seed": s.seed}
    if os.path.exists(marker):
        with open(marker) as f:
            saved = json.load(f)
        if saved.get("settings") == want:
            return {k: tuple(v) for k, v in saved["files"].items()}
    data_cfg = load([], list(s.common()) + list(s.overrides), task="pretrain").data
    files = sft_tasks.write_tasks(folder, data_cfg, s.sft_examples, s.sft_val_examples, s.seed)
    with open(marker, "w") as f:
        json.dump({"settings": want, "files": files}, f)
    return files


# Settings that are carried by a spec's own overrides, only choose which specs exist, or act after the runs
NOT_OUTCOME = ("steps", "sft_steps", "baseline_seeds", "evals", "recipes", "recipe_seeds", "optimizers", "cells",
               "optim_seeds", "conditions", "merge_checkpoints", "merge_last", "wgrad_draws", "objectives")


def _spec_record(spec: RunSpec, s: Settings) -> dict:
    """What decides a run's outcome: its spec and the shared settings that reach it."""
    d = asdict(s)
    if not spec.inject:
        d.pop("spikes")
    if spec.task != "sft":
        d.pop("sft_examples"), d.pop("sft_val_examples"), d.pop("sft_lr")
    return _outcome({"spec": asdict(spec), "settings": d})


def _outcome(record: dict) -> dict:
    """`record` without the keys that cannot change a run (also applied to records saved by older versions)."""
    return {**record, "settings": {k: v for k, v in record["settings"].items() if k not in NOT_OUTCOME}}


def execute(spec: RunSpec, s: Settings, work: str, say=print) -> Result:
    """Run `spec` (or reuse its finished run) and return its Result."""
    run_dir = os.path.join(work, spec.name)
    record = _spec_record(spec, s)
    spec_path, summary_path = os.path.join(run_dir, "report_spec.json"), os.path.join(run_dir, "summary.json")
    if os.path.exists(spec_path) and os.path.exists(summary_path):
        with open(spec_path) as f:
            same = _outcome(json.load(f)) == json.loads(json.dumps(record))
        if same:
            with open(summary_path) as f:
                summary = json.load(f)
            say(f"  {spec.name}: reusing the finished run in {run_dir}")
            return Result(spec, summary, *curves(run_dir))
    cfg = config_of(spec, s, work)
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(summary_path):
        os.remove(summary_path)
    if spec.spikes:
        summary = spikes.train(cfg, s.spikes if spec.inject else None)
    else:
        summary = run(cfg)
    with open(spec_path, "w") as f:
        json.dump(record, f, indent=2)
    return Result(spec, summary, *curves(run_dir))
