"""Processes and engines: plain PyTorch for one process, DDP or the DeepSpeed engine under a launcher.

`deepspeed` and `torchrun` both export RANK / WORLD_SIZE / LOCAL_RANK; with several ranks and
DeepSpeed installed the DeepSpeed engine runs (ZeRO 0-3), otherwise torch DDP. On a machine without
GPUs (or with ``DS_ACCELERATOR=cpu``) the process group uses gloo.

The training loop sees either engine through a step adapter with the same methods
(`StepAdapter`s: `TorchEngine`, `DeepSpeedEngine`; `engine()` builds the one the run uses):

    with eng.micro_batch(i): loss = f(eng.model, batch); eng.backward(loss)
    grad_norm, skipped = eng.step(skip)      # one optimizer step, or a skipped one
    eng.model (what the forward runs through), eng.module (the model itself), eng.lr, eng.scheduler
    eng.model_state(), eng.save(folder), eng.load(folder, trainer_state)   # checkpoints
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .. import launcher
from ..errors import CheckpointError, UserError
from ..optim import zero
from .loading import load_file
from .model import clear_weight_caches

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "deepspeed")


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    engine: str  # "torch" | "deepspeed"
    owns_group: bool  # this run created the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def local_device(local_rank: int = 0) -> torch.device:
    """This rank's GPU, or the CPU on a machine without one (or with ``DS_ACCELERATOR=cpu``)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def setup(engine: str = "auto", zero_stage: int = 0) -> Env:
    """Ranks, device and (under a launcher, or for DeepSpeed) the process group; `engine` is dist.engine."""
    rank, world, local = launcher.ranks()
    if engine == "deepspeed" and not deepspeed_available():
        raise UserError("dist.engine: 'deepspeed' was asked for, but DeepSpeed is not installed")
    if engine == "auto":
        engine = "deepspeed" if world > 1 and deepspeed_available() else "torch"
    if zero_stage > 0 and engine != "deepspeed":
        raise UserError(f"dist.zero_stage: ZeRO stage {zero_stage} needs the DeepSpeed engine "
                           "(launch with deepspeed/torchrun and DeepSpeed installed, or set dist.engine=deepspeed)")
    device = local_device(local)
    owns = False
    if (world > 1 or engine == "deepspeed") and not tdist.is_initialized():
        backend = "gloo" if device.type == "cpu" else "nccl"
        if world == 1:  # a single-process DeepSpeed engine still needs a (one-member) group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        if engine == "deepspeed":
            import deepspeed  # optional and slow to import: only DeepSpeed runs load it

            deepspeed.init_distributed(dist_backend=backend)
        else:
            tdist.init_process_group(backend)
        owns = True
    return Env(rank, world, local, device, engine, owns)


def teardown(env: Env) -> None:
    if env.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(env: Env) -> None:
    if env.world > 1:
        tdist.barrier()


def all_sum(env: Env, *values: float) -> list[float]:
    """Sum Python floats over ranks (fp64)."""
    t = torch.tensor(values, dtype=torch.float64)
    if env.world > 1:
        tdist.all_reduce(t)
    return t.tolist()


def broadcast(env: Env, obj):
    """Rank 0's `obj` on every rank (a picklable value)."""
    if env.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _first_lines(e: BaseException, n: int = 2) -> str:
    """The head of a long torch message (load_state_dict lists every mismatched tensor)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:n]) + (f" (+{len(lines) - n} more)" if len(lines) > n else "")


def grad_norm(params) -> float:
    sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def _on_main(env: Env, state_dict: dict) -> dict | None:
    """A CPU copy of `state_dict` on rank 0, None elsewhere."""
    return {k: v.detach().clone().cpu() for k, v in state_dict.items()} if env.main else None


class StepAdapter:
    """What the training loop calls on an engine; `model` runs the forward (DDP, the DeepSpeed engine
    or the model itself), `module` is the model underneath."""

    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def micro_batch(self, i: int):
        """The context of micro-batch `i`'s forward and backward."""
        return contextlib.nullcontext()


class TorchEngine(StepAdapter):
    """Plain PyTorch (DDP over several ranks). The loss is divided over the micro-batches, DDP syncs
    gradients on the last one; a step clips, updates unless a value was non-finite, and always
    advances the schedule. Checkpoints hold the optimizer state in ``optimizer.pt``."""

    def __init__(self, model, optimizer, scheduler, cfg, env: Env, accum: int):
        self.module, self.optimizer, self.scheduler, self.env, self.accum = model, optimizer, scheduler, env, accum
        self.model = torch.nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def micro_batch(self, i: int):
        if self.env.world == 1 or i == self.accum - 1:
            return contextlib.nullcontext()
        return self.model.no_sync()  # DDP all-reduces the gradients on the last micro-batch only

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self, skip: bool) -> tuple[float, bool]:
        """(gradient norm, skipped): `skip` (a non-finite loss) or a non-finite norm leaves the weights."""
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip)) if not skip else float("nan")
        skip |= not math.isfinite(gnorm)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        clear_weight_caches(self.module)
        return gnorm, skip

    def model_state(self) -> dict | None:
        return _on_main(self.env, self.module.state_dict())

    def save(self, folder: str) -> None:
        if self.env.main:
            torch.save(self.optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))

    def load(self, folder: str, trainer_state: dict) -> None:

        for name, target in (("model.pt", self.module), ("optimizer.pt", self.optimizer)):
            path = os.path.join(folder, name)
            if name == "optimizer.pt" and not os.path.isfile(path) and os.path.isdir(os.path.join(folder, "deepspeed")):
                raise CheckpointError(f"{folder}: written by the DeepSpeed engine (deepspeed/, no optimizer.pt); "
                                      "resume it with dist.engine=deepspeed")
            state = load_file(path)
            try:
                target.load_state_dict(state)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                what = "model" if name == "model.pt" else "optimizer"
                raise CheckpointError(f"{path}: does not fit this run's {what}: {_first_lines(e)}") from None
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        clear_weight_caches(self.module)


class DeepSpeedEngine(StepAdapter):
    """The DeepSpeed engine (ZeRO 0-3): it accumulates, clips and steps the schedule itself, and saves
    every rank's partitions under ``deepspeed/``. Its accumulation counters must advance on every
    step, so a skipped step still runs, at learning rate 0."""

    def __init__(self, model, optimizer, scheduler, cfg, env: Env, micro_bs: int, accum: int):
        import deepspeed  # optional and slow to import: only DeepSpeed runs load it

        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, micro_bs, accum))
        if cfg.optim.name != "adamw":
            # Stable-SPAM's per-tensor statistics over ZeRO partitions (a no-op for stage 0 / elementwise optimizers)
            zero.attach(self.model)
        self.module, self.env, self.zero_stage = self.model.module, env, cfg.dist.zero_stage
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self, skip: bool) -> tuple[float | None, bool]:
        """(gradient norm or None where the engine does not report one, skipped)."""
        gnorm = grad_norm(self.params) if self.zero_stage == 0 and not skip else None
        skip |= gnorm is not None and not math.isfinite(gnorm)
        if skip:
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
        self.model.step()
        if gnorm is None and not skip:
            gn = self.model.get_global_grad_norm()
            gnorm = float(gn) if gn is not None else None
        skip |= gnorm is not None and not math.isfinite(gnorm)
        clear_weight_caches(self.module)
        return gnorm, skip

    def model_state(self) -> dict | None:
        """Collective under ZeRO-3 (the weights are gathered from every rank)."""
        if self.zero_stage == 3:
            return _on_main(self.env, self.model._zero3_consolidated_16bit_state_dict())
        return _on_main(self.env, self.module.state_dict())

    def save(self, folder: str) -> None:
        self.model.save_checkpoint(folder, tag="deepspeed", save_latest=False)

    def load(self, folder: str, trainer_state: dict) -> None:
        self.model.load_checkpoint(folder, tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=True)
        clear_weight_caches(self.module)


def deepspeed_config(cfg, micro_bs: int, accum: int) -> dict:
    path = cfg.dist.deepspeed_config or os.path.join(CONFIG_DIR, f"zero{cfg.dist.zero_stage}.json")
    with open(path) as f:
        ds = json.load(f)
    ds["train_micro_batch_size_per_gpu"] = micro_bs
    ds["gradient_accumulation_steps"] = accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = cfg.dist.zero_stage if cfg.dist.deepspeed_config is None \
        else ds.get("zero_optimization", {}).get("stage", 0)
    # lowbit's optimizers are not on DeepSpeed's list of tested ones
    ds["zero_allow_untested_optimizer"] = True
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    ds["steps_per_print"] = 10 ** 9
    return ds


def engine(model, optimizer, scheduler, cfg, env: Env, micro_bs: int, accum: int) -> StepAdapter:
    """The step adapter of the engine `env` chose."""
    if env.engine == "deepspeed":
        return DeepSpeedEngine(model, optimizer, scheduler, cfg, env, micro_bs, accum)
    return TorchEngine(model, optimizer, scheduler, cfg, env, accum)
