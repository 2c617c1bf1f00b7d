"""``train.ema``: an exponential moving average of the weights the optimizer steps, sharded as they are.

After every ``train.ema_every``-th optimizer step that was not skipped (a non-finite loss or
gradient leaves the weights, and the EMA, as they were)::

    ema <- decay * ema + (1 - decay) * w        computed as torch.lerp(ema, w, 1 - decay) in fp32

No bias correction: the EMA starts as an fp32 copy of the initial weights (not zeros), so it is
an average of real weights from the first step on (the initial weights keep the share
``decay ** updates``). Bias correction (dividing by ``1 - decay ** n``) is only needed for an
average started at zero.

What is averaged is the master copy the optimizer steps, and each rank keeps what it holds:

- DeepSpeed ZeRO 3: this rank's flat fp32 partitions (``fp32_partitioned_groups_flat``); ZeRO 1/2:
  ``single_partition_of_fp32_groups``; DeepSpeed's BF16_Optimizer: ``fp32_groups_flat_partition``.
  Each rank keeps the EMA of its own partitions only (1/world of the EMA's memory), read through
  the same descriptions of the partitions `lowbit.optim.zero` uses (ZeRO 3: ``partition_numel`` of
  each parameter, in sub-group order; ZeRO 1/2: each parameter's ``_hp_mapping`` fragment).
- DeepSpeed stage 0 with bf16 parameters: the unpartitioned fp32 master (``fp32_groups_flat``).
- Plain PyTorch (one process or DDP): the parameters themselves (fp32 copies of bf16 ones).

The update is elementwise, so it does not matter how the weights are cut into partitions: a
sharded EMA holds the same bits as the full EMA of the same weights.

Checkpoints hold ``ema/rank<r>.pt`` for every rank that holds a shard (only ``rank0.pt`` where
every rank holds the same full EMA): the fp32 shards and their piece table (parameter name,
offset in the parameter, length, shard, offset in the shard). A resume with the same layout
loads its own file (bit for bit); `assemble` rebuilds the full tensors from the files alone, which
is how ``lowbit eval --ema``, ``model.init_from_ema=true`` and a resume with another layout read
them, without DeepSpeed. `full_state` gathers the live EMA onto rank 0 (for the ``hf-ema`` export).
"""
from __future__ import annotations

import glob
import os
import re

import torch
import torch.distributed as tdist

from ..errors import CheckpointError, UserError
from .loading import load_file

FOLDER = "ema"
FORMAT = 1


def _names(module) -> dict:
    return {id(p): n for n, p in module.named_parameters()}


def _shape(p) -> list[int]:
    return [int(s) for s in getattr(p, "ds_shape", p.shape)]


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


class _Layout:
    """Where this rank's master weights are: `flats()` (the live tensors the optimizer steps, re-read
    on every call), `table` rows (name index, offset in the parameter, length, flat index, offset in
    the flat), `names` and `shapes` of every averaged parameter (the same list on every rank) and
    whether each rank holds only a part (`sharded`)."""

    def __init__(self, module, optimizer):
        z, ids = optimizer, _names(module)
        if hasattr(z, "fp32_partitioned_groups_flat") and hasattr(z, "fp16_groups"):  # ZeRO 3
            if getattr(z, "swap_optimizer", False):
                raise UserError("train.ema: optimizer state swapped to NVMe (offload_optimizer.device='nvme') is "
                                "not supported; use offload to 'cpu' or none, or train.ema=0")
            self._get = lambda: z.fp32_partitioned_groups_flat
            self.sharded, groups = True, z.fp16_groups
            rows = self._stage3_rows(z, groups, ids)
        elif hasattr(z, "single_partition_of_fp32_groups") and hasattr(z, "bit16_groups"):  # ZeRO 1/2
            self._get = lambda: z.single_partition_of_fp32_groups
            self.sharded, groups = True, z.bit16_groups
            rows = self._fragment_rows(groups, ids)
        elif hasattr(z, "fp32_groups_flat_partition") and hasattr(z, "bf16_groups"):  # BF16_Optimizer
            self._get = lambda: z.fp32_groups_flat_partition
            self.sharded, groups = True, z.bf16_groups
            rows = self._fragment_rows(groups, ids)
        elif hasattr(z, "fp32_groups_flat") and hasattr(z, "fp16_groups"):  # stage 0, 16-bit parameters
            self._get = lambda: z.fp32_groups_flat
            self.sharded, groups = False, z.fp16_groups
            rows = [(p, 0, p.numel(), i, off) for i, g in enumerate(groups) for p, off in zip(g, _offsets(g))]
        else:  # the optimizer steps the parameters themselves
            params = list(dict.fromkeys(p for p in module.parameters() if p.requires_grad))
            self._get = lambda: [p.detach().view(-1) for p in params]
            self.sharded, groups = False, [params]
            rows = [(p, 0, p.numel(), i, 0) for i, p in enumerate(params)]
        order = [p for g in groups for p in g]
        missing = [p for p in order if id(p) not in ids]
        if missing:
            raise UserError(f"train.ema: the optimizer steps {len(missing)} tensors that are not parameters of the "
                            "model; the EMA averages model parameters only")
        self.names = [ids[id(p)] for p in order]
        self.shapes = [_shape(p) for p in order]
        index = {id(p): i for i, p in enumerate(order)}
        self.table = [[index[id(p)], int(po), int(n), int(fi), int(fo)] for p, po, n, fi, fo in rows if n > 0]

    @staticmethod
    def _stage3_rows(z, groups, ids) -> list:
        rows = []
        for sg, g in enumerate(groups):
            rank = tdist.get_rank(group=z.sub_group_process_groups[sg])
            offset = 0
            for p in g:
                part = p.partition_numel()
                lo = rank * part
                rows.append((p, lo, max(0, min(lo + part, p.ds_numel) - lo), sg, offset))
                offset += part
            held = z.fp32_partitioned_groups_flat[sg].numel()
            if offset != held:
                raise RuntimeError(f"train.ema: ZeRO 3 sub group {sg} holds {held} elements, its parameters' "
                                   f"partitions {offset}; this DeepSpeed lays partitions out differently")
        return rows

    @staticmethod
    def _fragment_rows(groups, ids) -> list:
        rows = []
        for i, g in enumerate(groups):
            for p in g:
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    hp, lp = m.get_hp_fragment_address(), m.lp_fragment_address
                    rows.append((p, int(lp.start), int(hp.numel), i, int(hp.start)))
        return rows

    def flats(self) -> list[torch.Tensor]:
        return list(self._get())


def _offsets(group) -> list[int]:
    out, off = [], 0
    for p in group:
        out.append(off)
        off += p.numel()
    return out


class EMA:
    """The EMA of a model's master weights (see the module docstring); `module` is the model, `optimizer`
    what the engine steps (DeepSpeed's ZeRO optimizer, or a torch optimizer)."""

    def __init__(self, module, optimizer, decay: float, every: int = 1, rank: int = 0, world: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema: expected a decay in (0, 1), got {decay!r}")
        self.decay, self.every, self.rank, self.world, self.updates = float(decay), int(every), rank, world, 0
        self.layout = _Layout(module, optimizer)
        with torch.no_grad():
            self.shards = [f.detach().reshape(-1).float().clone() for f in self.layout.flats()]

    @property
    def sharded(self) -> bool:
        return self.layout.sharded

    @property
    def names(self) -> list[str]:
        return self.layout.names

    def update(self, step: int) -> bool:
        """After optimizer step `step` (1-based; skipped steps are not passed): average every `every`-th."""
        if step % self.every:
            return False
        weight = 1.0 - self.decay
        with torch.no_grad():
            flats = [f.detach().reshape(-1) for f in self.layout.flats()]
            if all(f.dtype == torch.float32 and f.device == e.device for f, e in zip(flats, self.shards)):
                torch._foreach_lerp_(self.shards, flats, weight)
            else:  # 16-bit parameters stepped directly: one fp32 copy at a time
                for e, f in zip(self.shards, flats):
                    e.lerp_(f.to(device=e.device, dtype=torch.float32), weight)
        self.updates += 1
        return True

    # ---- checkpoint -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": FORMAT, "decay": self.decay, "every": self.every, "updates": self.updates,
                "rank": self.rank, "world": self.world, "sharded": self.sharded, "names": list(self.names),
                "shapes": [list(s) for s in self.layout.shapes], "table": [list(r) for r in self.layout.table],
                "shards": [s.detach().cpu().clone() for s in self.shards]}

    def save(self, ckpt: str) -> None:
        """Write this rank's ``ema/rank<r>.pt`` into checkpoint folder `ckpt` (every rank calls it)."""
        if self.sharded or self.rank == 0:
            os.makedirs(os.path.join(ckpt, FOLDER), exist_ok=True)
            torch.save(self.state(), os.path.join(ckpt, FOLDER, f"rank{self.rank}.pt"))

    def load(self, ckpt: str) -> bool:
        """Restore from checkpoint folder `ckpt`; False when it holds no EMA (the run trained without one)."""
        if not os.path.isdir(os.path.join(ckpt, FOLDER)):
            return False
        own = os.path.join(ckpt, FOLDER, f"rank{self.rank if self.sharded else 0}.pt")
        st = load_file(own) if os.path.isfile(own) else None
        if st is not None and st["names"] == self.names and st["table"] == self.layout.table and \
                [s.numel() for s in st["shards"]] == [s.numel() for s in self.shards]:
            with torch.no_grad():
                for e, s in zip(self.shards, st["shards"]):
                    e.copy_(s)
        else:  # written with another world size or partitioning: cut this rank's pieces from the full tensors
            full, st = assemble(ckpt)
            unknown = [n for n in self.names if n not in full]
            if unknown:
                raise CheckpointError(f"{ckpt}/{FOLDER}: holds no EMA of {unknown[:3]} (a different model?)")
            with torch.no_grad():
                for ni, po, n, fi, fo in self.layout.table:
                    self.shards[fi][fo:fo + n].copy_(full[self.names[ni]].reshape(-1)[po:po + n])
        self.updates = int(st["updates"])
        return True

    # ---- export -----------------------------------------------------------------------------------
    def full_state(self, device: torch.device | None = None) -> dict | None:
        """{parameter name: full fp32 EMA (CPU)} on rank 0, None elsewhere. Collective when sharded: per
        parameter, each rank fills its pieces into a tensor of -0.0 and the ranks reduce by sum onto rank 0
        (x + -0.0 == x for every x, signed zeros included, so the gather is exact)."""
        out = {} if self.rank == 0 else None
        device = device or (self.shards[0].device if self.shards else torch.device("cpu"))
        rows: dict[int, list] = {}
        for r in self.layout.table:
            rows.setdefault(r[0], []).append(r)
        for ni, (name, shape) in enumerate(zip(self.names, self.layout.shapes)):
            numel = 1
            for s in shape:
                numel *= s
            if not self.sharded:
                if out is not None:
                    t = torch.full((numel,), -0.0)
                    for _, po, n, fi, fo in rows.get(ni, []):
                        t[po:po + n] = self.shards[fi][fo:fo + n].cpu()
                    out[name] = t.view(shape)
                continue
            t = torch.full((numel,), -0.0, dtype=torch.float32, device=device)
            for _, po, n, fi, fo in rows.get(ni, []):
                t[po:po + n] = self.shards[fi][fo:fo + n].to(device)
            if self.world > 1:
                tdist.reduce(t, dst=0)
            if out is not None:
                out[name] = t.view(shape).cpu()
        return out


def overlay(module, state_dict: dict, ema: dict) -> dict:
    """`state_dict` (the model's, e.g. for the HF export) with every averaged parameter replaced by its EMA;
    a tied parameter's every name gets it."""
    canon = _names(module)
    out = dict(state_dict)
    for name, p in module.named_parameters(remove_duplicate=False):
        src = canon.get(id(p))
        if src in ema:
            out[name] = ema[src]
    return out


def assemble(ckpt: str) -> tuple[dict, dict]:
    """({parameter name: full fp32 EMA}, the header of one rank's file) from checkpoint folder `ckpt`'s
    ``ema/rank*.pt``, without DeepSpeed. CheckpointError when it holds none or not all of it."""
    files = sorted(glob.glob(os.path.join(ckpt, FOLDER, "rank*.pt")),
                   key=lambda f: int(re.sub(r"\D", "", os.path.basename(f)) or 0))
    if not files:
        raise CheckpointError(f"{ckpt}: holds no EMA weights ({FOLDER}/rank*.pt); train with train.ema=<decay> "
                              "to keep them")
    full, filled, head = {}, {}, None
    for path in files:
        st = load_file(path)
        try:
            names, shapes, table, shards = st["names"], st["shapes"], st["table"], st["shards"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: not a lowbit EMA file") from None
        head = head or st
        for ni, po, n, fi, fo in table:
            name = names[ni]
            if name not in full:
                full[name] = torch.zeros(shapes[ni], dtype=torch.float32)
                filled[name] = 0
            full[name].view(-1)[po:po + n] = shards[fi][fo:fo + n]
            filled[name] += n
        for name, shape in zip(names, shapes):  # a parameter no file holds a piece of
            full.setdefault(name, torch.zeros(shape, dtype=torch.float32))
            filled.setdefault(name, 0)
    short = [n for n, t in full.items() if filled[n] != t.numel()]
    if short:
        raise CheckpointError(f"{ckpt}/{FOLDER}: the rank files cover only part of {short[:3]} "
                              f"({len(files)} file(s), written with world size {head.get('world')})")
    return full, head
