"""The arms of `lowbit report convergence`, as lists of run specifications.

  ladder  recipe ladder: bf16 (several seeds: the noise band) vs fp8-tensorwise, mxfp8, nvfp4,
          nvfp4 without RHT, nvfp4 without SR, mxfp4, int4; `recipe_seeds` seeds each
  optim   cells "recipe:optimizer" (default mxfp4 with AdamW, SPAM, Stable-SPAM) over `optim_seeds`
          seeds, clean and / or with injected gradient spikes (`lowbit.report.spikes`)
  merge   a bf16 run at a constant learning rate whose last checkpoints are merged with WSM's
          weights (`lowbit merge`), against the cosine-decay bf16 runs of the ladder
  sft     from the bf16 seed-0 checkpoint of the ladder: SFT on a strong-prior and a weak-prior
          task (`lowbit.report.sft_tasks`) with nll vs neg_p vs threshold

A clean optim run of AdamW with a recipe and seed the ladder already runs is that ladder run (the
spike loop without spikes gives `lowbit.train.run`'s losses bit for bit), so it is planned once.

Every run shares `Settings` (model, data, steps, learning rate); a spec adds only what its arm
varies. Specs are plain data: `runner.execute` turns one into a `lowbit.train` config and runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .spikes import SpikePlan

ARMS = ("ladder", "optim", "merge", "sft")
DEFAULT_ARMS = ("ladder", "optim", "sft")
LADDER = ("bf16", "fp8-tensorwise", "mxfp8", "nvfp4", "nvfp4-no-rht", "nvfp4-no-sr", "mxfp4", "int4")
CONDITIONS = ("clean", "spikes")
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
    recipe_seeds: int = 1  # seeds of every other ladder recipe (paired with the baseline's first seeds)
    optimizers: tuple[str, ...] = OPTIMIZERS  # optim arm with `cells` empty: OPTIM_RECIPE x these
    cells: tuple[str, ...] = ()  # optim arm: "recipe:optimizer" (gaps are taken against the recipe's adamw)
    optim_seeds: int = 1
    conditions: tuple[str, ...] = CONDITIONS  # optim arm: clean and / or with injected spikes
    merge_checkpoints: int = 10  # merge arm: checkpoints over the run (every steps / this)
    merge_last: int = 5  # ... of which the last this many are merged
    wgrad_draws: int = 32  # draws of the weight-gradient estimator section (0 = leave it out)
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
    recipe: str = "bf16"  # pretraining runs: what `claims` groups them by
    optimizer: str = "adamw"
    condition: str = "clean"  # clean | spikes | constant-lr (the merge arm's run)


def pretrain_overrides(s: Settings, steps: int, seed: int) -> list[str]:
    return [f"train.steps={steps}", f"train.seed={seed}", f"optim.lr={s.lr}", f"optim.warmup_steps={s.warmup}",
            f"train.eval_every={max(1, steps // s.evals)}"]


def ladder(s: Settings, recipes: tuple[str, ...] | None = None) -> list[RunSpec]:
    specs = []
    for r in recipes or s.recipes:
        n = s.baseline_seeds if r == BASELINE else s.recipe_seeds
        for seed in range(s.seed, s.seed + n):
            specs.append(RunSpec("ladder", f"ladder-{r}-s{seed}", "pretrain", r, seed,
                                 tuple(pretrain_overrides(s, s.steps, seed) + [f"quant.recipe={r}"]), recipe=r))
    return specs


def cells(s: Settings) -> list[tuple[str, str]]:
    """The optim arm's (recipe, optimizer) pairs."""
    if not s.cells:
        return [(OPTIM_RECIPE, o) for o in s.optimizers]
    out = []
    for c in s.cells:
        recipe, sep, opt = c.partition(":")
        if not sep or not recipe or opt not in OPTIMIZERS:
            raise ValueError(f"cells: expected 'recipe:optimizer' with an optimizer in {list(OPTIMIZERS)}, got {c!r}")
        out.append((recipe, opt))
    return out


def optim(s: Settings) -> list[RunSpec]:
    specs = []
    for cond in s.conditions:
        if cond not in CONDITIONS:
            raise ValueError(f"conditions: expected a subset of {list(CONDITIONS)}, got {list(s.conditions)}")
        for recipe, o in cells(s):
            for seed in range(s.seed, s.seed + s.optim_seeds):
                specs.append(RunSpec("optim", f"optim-{recipe}-{o}-{cond}-s{seed}", "pretrain", f"{o} {cond}", seed,
                                     tuple(pretrain_overrides(s, s.steps, seed) + [f"quant.recipe={recipe}",
                                                                                   f"optim.name={o}"]),
                                     spikes=True, inject=cond == "spikes", recipe=recipe, optimizer=o,
                                     condition=cond))
    return specs


def merge_every(s: Settings) -> int:
    return max(1, s.steps // s.merge_checkpoints)


def merge(s: Settings) -> list[RunSpec]:
    """The constant-learning-rate bf16 run whose checkpoints the merge arm averages."""
    every = merge_every(s)
    over = pretrain_overrides(s, s.steps, s.seed) + [f"quant.recipe={BASELINE}", "optim.schedule=constant",
                                                     f"train.checkpoint_every={every}",
                                                     f"train.keep_checkpoints={s.merge_last}"]
    return [RunSpec("merge", f"merge-{BASELINE}-constant-s{s.seed}", "pretrain", "constant-lr", s.seed, tuple(over),
                    recipe=BASELINE, condition="constant-lr")]


def _same_run(a: RunSpec, b: RunSpec) -> bool:
    """A clean optim run that a ladder run already is (same recipe, AdamW, seed and overrides)."""
    return (a.optimizer == b.optimizer == "adamw" and not a.inject and a.recipe == b.recipe and a.seed == b.seed
            and set(a.overrides) - {"optim.name=adamw"} == set(b.overrides))


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


def plan(s: Settings, arms: tuple[str, ...] = DEFAULT_ARMS) -> list[RunSpec]:
    """Every run the chosen arms need, in order (the sft arm's pretrained base first when needed)."""
    if BASELINE not in s.recipes:
        raise ValueError(f"recipes: the ladder needs its baseline {BASELINE!r}, got {list(s.recipes)}")
    specs = []
    if "ladder" in arms:
        specs += ladder(s)
    if "optim" in arms:
        lad = list(specs)
        specs += [sp for sp in optim(s) if not any(_same_run(sp, ls) for ls in lad)]
    if "merge" in arms:
        specs += merge(s)
    if "sft" in arms:
        if "ladder" not in arms:
            specs += [sp for sp in ladder(s, (BASELINE,)) if sp.seed == s.seed]
        specs += sft(s)
    return specs
