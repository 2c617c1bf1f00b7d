"""Processes and engines: plain PyTorch for one process, the DeepSpeed engine under a launcher.

`deepspeed` and `torchrun` both export RANK / WORLD_SIZE / LOCAL_RANK; with several ranks and
DeepSpeed installed the DeepSpeed engine runs (ZeRO 0-3), otherwise torch DDP. On a machine without
GPUs (or with ``DS_ACCELERATOR=cpu``) the process group uses gloo.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

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


def _use_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def setup(cfg) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    choice = cfg.dist.engine
    if choice == "deepspeed" and not deepspeed_available():
        raise RuntimeError("dist.engine: 'deepspeed' was asked for, but DeepSpeed is not installed")
    engine = "deepspeed" if choice == "deepspeed" or (choice == "auto" and world > 1 and deepspeed_available()) else "torch"
    if cfg.dist.zero_stage > 0 and engine != "deepspeed":
        raise RuntimeError(f"dist.zero_stage: ZeRO stage {cfg.dist.zero_stage} needs the DeepSpeed engine "
                           "(launch with deepspeed/torchrun and DeepSpeed installed, or set dist.engine=deepspeed)")
    device = torch.device("cpu") if _use_cpu() else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
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
            import deepspeed
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


def wrap(model, optimizer, scheduler, cfg, env: Env, micro_bs: int, accum: int):
    """(engine-or-model, optimizer, scheduler) for the chosen engine."""
    if env.engine == "deepspeed":
        import deepspeed
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                     config=deepspeed_config(cfg, micro_bs, accum))
        if cfg.optim.name != "adamw":
            # Stable-SPAM's per-tensor statistics over ZeRO partitions (a no-op for stage 0 / elementwise optimizers)
            from ..optim import zero
            zero.attach(engine)
        return engine, opt, sched
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, optimizer, scheduler
