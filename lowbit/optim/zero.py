"""Stable-SPAM's per-tensor statistics under DeepSpeed ZeRO 1/2/3.

DeepSpeed steps a client optimizer on flat fp32 partitions: under ZeRO 1/2 one flat tensor
per parameter group holding this rank's slice of all the group's parameters laid end to end;
under ZeRO 3 one flat tensor per sub group holding this rank's slice of each parameter. The
elementwise part of an optimizer does not care, but Stable-SPAM's AdaClip (max |g|) and AdaGN
(||g||) are statistics of each *original* tensor. `attach` reads DeepSpeed's own description of
the partitions (ZeRO 1/2: the fragment map ``param._hp_mapping`` that DeepSpeed builds for every
parameter, also behind ``deepspeed.utils.safe_get_local_fp32_param``; ZeRO 3: each parameter's
``ds_numel`` / ``partition_numel()`` and the sub-group order) and hands the optimizer a
`PartitionLayout`: for every flat partition, the list of original tensors with the slice of each
that this rank holds. Nothing in DeepSpeed is patched or wrapped.

Each step the optimizer then computes max |g| and sum g^2 of its local slices, gathers them
over the data-parallel group in one collective (an all-gather of a [tensors, 2] fp64 table,
combined in rank order, so every rank gets the same bits), advances the per-tensor statistics
(replicated on every rank, for every tensor of the partition's group, including tensors this
rank holds no slice of), and applies the resulting clip threshold and norm factor to every slice.
A second, equally small collective runs only on steps where AdaClip clips some tensor (the norm
is taken after clipping). A tensor with a NaN / Inf anywhere is skipped on every rank.

Wiring (a user script, and lowbit/train/)::

    import deepspeed
    from lowbit.optim import StableSPAM, zero

    model = ...                                    # any nn.Module, e.g. a transformers model
    opt = StableSPAM(model.parameters(), lr=1e-3, reset_interval=1000)
    engine, opt_wrapper, _, _ = deepspeed.initialize(
        model=model, optimizer=opt,
        config={"train_micro_batch_size_per_gpu": 4,
                "zero_optimization": {"stage": 2},      # 0, 1, 2 or 3
                "zero_allow_untested_optimizer": True})  # DeepSpeed's gate for client optimizers
    zero.attach(engine)                            # once, after initialize, before the first step
    for batch in data:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(path)                   # the statistics are in opt.state_dict()
    engine.load_checkpoint(path)                   # ... and come back with it; no re-attach needed

Notes:
  * Without `attach` a StableSPAM step on a ZeRO partition raises (it never silently computes
    the statistics per partition). `attach` is a no-op for stage 0 and for optimizers whose
    arithmetic is elementwise (``elementwise_update``: SPAM, CLASSP).
  * State dtypes other than fp32 quantize the flat partition's moments in blocks that may span
    two tensors, so they do not give the same bits as a run without ZeRO (fp32 does, up to the
    summation order of the gradient reduction and of the statistics).
  * Optimizer-state offload to NVMe (``offload_optimizer.device = "nvme"``) swaps the flat
    partitions in and out and is rejected; offload to CPU works.
  * DeepSpeed calls ``step()`` once per parameter group (ZeRO 3: per sub group, with the other
    groups emptied); each flat partition counts its own steps (StableSPAM and SPAM, with or
    without `attach`), so resets, warm-ups and schedules see one step per training step.
    ``optimizer.stats`` count calls: "steps" and "resets" there are per call, not per training step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._device import upload


@dataclass(frozen=True)
class TensorSlice:
    """One original tensor of a flat partition: its full size, and the slice this rank holds
    (``start`` in the flat partition, ``length`` elements; ``start`` None and length 0 if none)."""
    numel: int
    start: int | None
    length: int


@dataclass(frozen=True)
class FlatLayout:
    tensors: tuple[TensorSlice, ...]
    group: object  # the data-parallel process group the tensors are partitioned over


class PartitionLayout:
    """Flat partition tensor -> `FlatLayout`."""

    def __init__(self, flats: list[tuple[torch.Tensor, FlatLayout]]):
        self._flats = {id(t): (t, fl) for t, fl in flats}

    def covers(self, t: torch.Tensor) -> bool:
        entry = self._flats.get(id(t))
        return entry is not None and entry[0] is t

    def flat(self, t: torch.Tensor) -> FlatLayout:
        if not self.covers(t):
            raise KeyError("not a flat partition of this layout")
        return self._flats[id(t)][1]

    def __len__(self) -> int:
        return len(self._flats)


# ---------------------------------------------------------------------------------------------
# reading DeepSpeed's partitions
# ---------------------------------------------------------------------------------------------
def _stage12_layout(zopt, bit16_groups, flats) -> list:
    out = []
    for i, flat in enumerate(flats):
        tensors = []
        for p in bit16_groups[i]:
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                tensors.append(TensorSlice(p.numel(), None, 0))
            else:
                a = m.get_hp_fragment_address()
                tensors.append(TensorSlice(p.numel(), int(a.start), int(a.numel)))
        out.append((flat, FlatLayout(tuple(tensors), zopt.real_dp_process_group[i])))
    return out


def _stage3_layout(zopt) -> list:
    if getattr(zopt, "swap_optimizer", False):
        raise ValueError("zero.attach: optimizer state swapped to NVMe (offload_optimizer.device='nvme') is not "
                         "supported; use offload to 'cpu' or none")
    out = []
    for sg, flat in enumerate(zopt.fp32_partitioned_groups_flat):
        group = zopt.sub_group_process_groups[sg]
        rank = dist.get_rank(group=group)
        tensors, offset = [], 0
        for p in zopt.fp16_groups[sg]:
            part = p.partition_numel()
            lo, hi = rank * part, min((rank + 1) * part, p.ds_numel)
            n = max(0, hi - lo)
            tensors.append(TensorSlice(int(p.ds_numel), offset if n else None, n))
            offset += part
        if offset != flat.numel():
            raise RuntimeError(f"zero.attach: sub group {sg} holds {flat.numel()} elements, its parameters' "
                               f"partitions {offset}; this DeepSpeed lays ZeRO 3 partitions out differently")
        out.append((flat, FlatLayout(tuple(tensors), group)))
    return out


def layout_of(zero_optimizer) -> PartitionLayout | None:
    """The `PartitionLayout` of a DeepSpeed ZeRO optimizer (None for an unpartitioned optimizer)."""
    z = zero_optimizer
    if hasattr(z, "fp32_partitioned_groups_flat") and hasattr(z, "fp16_groups"):  # ZeRO 3
        return PartitionLayout(_stage3_layout(z))
    if hasattr(z, "single_partition_of_fp32_groups") and hasattr(z, "bit16_groups"):  # ZeRO 1/2
        return PartitionLayout(_stage12_layout(z, z.bit16_groups, z.single_partition_of_fp32_groups))
    if hasattr(z, "fp32_groups_flat_partition") and hasattr(z, "bf16_groups"):  # BF16_Optimizer (ZeRO 1)
        return PartitionLayout(_stage12_layout(z, z.bf16_groups, z.fp32_groups_flat_partition))
    return None


def attach(engine) -> PartitionLayout | None:
    """Give the client optimizer of a DeepSpeed engine the layout of its ZeRO partitions.

    `engine` is what ``deepspeed.initialize`` returned first (or the ZeRO optimizer itself).
    Returns the layout (None when DeepSpeed does not partition: stage 0).
    """
    outer = getattr(engine, "optimizer", engine)
    if outer is None:
        raise ValueError("engine: it has no optimizer (pass optimizer=... to deepspeed.initialize)")
    client = getattr(outer, "optimizer", None)
    layout = layout_of(outer)
    if layout is None:  # stage 0: DeepSpeed steps the original parameters (maybe through a wrapper)
        if not isinstance(outer, torch.optim.Optimizer) and not isinstance(client, torch.optim.Optimizer):
            raise TypeError(f"engine: expected a DeepSpeed engine or ZeRO optimizer, got {type(engine).__name__}")
        return None
    if hasattr(client, "set_partition_layout"):
        client.set_partition_layout(layout)
    elif not getattr(client, "elementwise_update", False):
        raise TypeError(f"engine: its client optimizer {type(client).__name__} has no per-tensor statistics for "
                        "lowbit.optim.zero to map (expected a lowbit optimizer)")
    return layout


# ---------------------------------------------------------------------------------------------
# the reduction
# ---------------------------------------------------------------------------------------------
_OPS = ("max", "sum")


def gather_reduce(table: torch.Tensor, ops, group) -> torch.Tensor:
    """Combine a [n, k] fp64 table over `group`: column j by ops[j] ("max" or "sum"), in rank
    order, so every rank gets the same bits. One all-gather."""
    world = dist.get_world_size(group=group)
    if world == 1:
        return table
    device = table.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        table = table.to(torch.device("cuda", torch.cuda.current_device()))
    elif dist.get_backend(group) != "nccl" and device.type == "cuda":
        table = table.cpu()  # gloo gathers host tensors
    parts = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(parts, table.contiguous(), group=group)
    out = parts[0].clone()
    for p in parts[1:]:
        for j, op in enumerate(ops):
            out[:, j] = torch.maximum(out[:, j], p[:, j]) if op == "max" else out[:, j] + p[:, j]
    return out.to(device)


def reduce_table(pieces, table: torch.Tensor, ops) -> None:
    """In place: replace row i of `table` ([len(pieces), k] fp64), for each ZeRO piece i, by its
    combination over the piece's process group (rows of pieces without a group are left as
    they are). On the table's device: nothing is read back to the host."""
    for op in ops:
        if op not in _OPS:
            raise ValueError(f"ops: expected 'max' or 'sum', got {op!r}")
    by_group: dict[int, tuple] = {}
    for i, pc in enumerate(pieces):
        if pc.group is not None:
            by_group.setdefault(id(pc.group), (pc.group, []))[1].append(i)
    for group, rows in by_group.values():
        idx = upload(rows, torch.int64, table.device)
        table.index_copy_(0, idx, gather_reduce(table.index_select(0, idx), ops, group))
