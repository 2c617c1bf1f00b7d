"""The three arms of `lowbit report convergence`, as lists of run specifications.

  ladder  recipe ladder: bf16 (several seeds: the noise band) vs fp8-tensorwise, mxfp8, nvfp4,
          nvfp4 without RHT, nvfp4 without SR, mxfp4; one seed each
  optim   an FP4 recipe (mxfp4) with AdamW vs SPAM vs Stable-SPAM, clean and with injected
          gradient spikes (`lowbit.report.spikes`)
  sft     from the bf16 seed-0 checkpoint of the ladder: SFT on a strong-prior and a weak-prior
          task (`lowbit.report.sft_tasks`) with nll vs neg_p vs threshold

Every run shares `Settings` (model, data, steps, learning rate); a spec adds only what its arm
varies. Specs are plain data: `runner.execute` turns one into a `lowbit.train` config and runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .spikes import SpikePlan

ARMS = ("ladder", "optim", "sft")
LADDER = ("bf16", "fp8-tensorwise", "mxfp8", "nvfp4", "nvfp4-no-rht", "nvfp4-no-sr", "mxfp4")
BASELINE = "bf16"
OPTIM_RECIPE = "mxfp4"
OPTIMIZERS = ("adamw", "spam", "stable_spam")
OBJECTIVES = ("nll", "neg_p", "threshold")


@dataclass
class Settings:
    """What every run of the report shares. The defaults (0.34 M parameters, 50 steps) ran all 21 runs in
    9 minutes on the shared 2-core CPU; scale up with flags (e.g. --hidden 128 --heads 4 --intermediate 384
    --seq-len 64 --batch 16 --steps 200: about 190 s per bf16 run there) or on a GPU."""
    steps: int = 50
    sft_steps: int = 25
    baseline_seeds: int = 3
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    seq_len: int = 32
    batch: int = 8
    lr: float = 3e-3
    sft_lr: float = 1e-3
    warmup: int = 10
    eval_batches: int = 8
    evals: int = 4  # validation points per run (the last at the final step)
    sft_examples: int = 2048
    sft_val_examples: int = 128
    spikes: SpikePlan = field(default_factory=SpikePlan)
    recipes: tuple[str, ...] = LADDER  # ladder arm (must include the bf16 baseline)
    optimizers: tuple[str, ...] = OPTIMIZERS  # optim arm (gaps are taken against adamw)
    objectives: tuple[str, ...] = OBJECTIVES  # sft arm (gaps are taken against nll)
    overrides: tuple[str, ...] = ()  # key=value overrides applied to every run last

    def common(self) -> list[str]:
        return [f"model.hidden_size={self.hidden}", f"model.num_layers={self.layers}",
                f"model.num_heads={self.heads}", f"model.intermediate_size={self.intermediate}",
                f"data.seq_len={self.seq_len}", f"train.micro_batch_size={self.batch}",
                f"train.eval_batches={self.eval_batches}", "train.checkpoint_every=0", "train.log_every=1",
                "run.resume=never", "run.overwrite=true", "run.export_hf=false", "run.progress=false",
                "run.tensorboard=false"]


@dataclass(frozen=True)
class RunSpec:
    arm: str
    name: str  # unique, also the run folder name
    task: str  # pretrain | sft
    group: str  # what the arm compares: a recipe, an optimizer (+ condition), a task/objective
    seed: int
    overrides: tuple[str, ...]
    spikes: bool = False  # optim arm: run through lowbit.report.spikes (with or without injected spikes)
    inject: bool = False
    sft_task: str | None = None
    needs: str | None = None  # name of the run whose checkpoint this one starts from


def pretrain_overrides(s: Settings, steps: int, seed: int) -> list[str]:
    return [f"train.steps={steps}", f"train.seed={seed}", f"optim.lr={s.lr}", f"optim.warmup_steps={s.warmup}",
            f"train.eval_every={max(1, steps // s.evals)}"]


def ladder(s: Settings, recipes: tuple[str, ...] | None = None) -> list[RunSpec]:
    specs = []
    for r in recipes or s.recipes:
        seeds = range(s.seed, s.seed + s.baseline_seeds) if r == BASELINE else (s.seed,)
        for seed in seeds:
            specs.append(RunSpec("ladder", f"ladder-{r}-s{seed}", "pretrain", r, seed,
                                 tuple(pretrain_overrides(s, s.steps, seed) + [f"quant.recipe={r}"])))
    return specs


def optim(s: Settings, recipe: str = OPTIM_RECIPE) -> list[RunSpec]:
    specs = []
    for inject in (False, True):
        for o in s.optimizers:
            cond = "spikes" if inject else "clean"
            specs.append(RunSpec("optim", f"optim-{recipe}-{o}-{cond}-s{s.seed}", "pretrain", f"{o} {cond}", s.seed,
                                 tuple(pretrain_overrides(s, s.steps, s.seed) + [f"quant.recipe={recipe}",
                                                                                 f"optim.name={o}"]),
                                 spikes=True, inject=inject))
    return specs


def sft(s: Settings) -> list[RunSpec]:
    base = f"ladder-{BASELINE}-s{s.seed}"
    specs = []
    for task in ("strong", "weak"):
        for obj in s.objectives:
            specs.append(RunSpec("sft", f"sft-{task}-{obj}-s{s.seed}", "sft", f"{task} {obj}", s.seed,
                                 (f"train.steps={s.sft_steps}", f"train.seed={s.seed}", f"optim.lr={s.sft_lr}",
                                  f"optim.warmup_steps={s.warmup}", f"objective.name={obj}",
                                  f"train.eval_every={max(1, s.sft_steps // s.evals)}"),
                                 sft_task=task, needs=base))
    return specs


def plan(s: Settings, arms: tuple[str, ...] = ARMS) -> list[RunSpec]:
    """Every run the chosen arms need, in order (the sft arm's pretrained base first when needed)."""
    if BASELINE not in s.recipes:
        raise ValueError(f"recipes: the ladder needs its baseline {BASELINE!r}, got {list(s.recipes)}")
    specs = []
    if "ladder" in arms:
        specs += ladder(s)
    if "optim" in arms:
        specs += optim(s)
    if "sft" in arms:
        if "ladder" not in arms:
            specs += [sp for sp in ladder(s, (BASELINE,)) if sp.seed == s.seed]
        specs += sft(s)
    return specs
