"""The pieces an optimizer with per-tensor statistics steps on, under DeepSpeed ZeRO or not.

A piece is one original tensor as this rank sees it: a whole parameter, or its slice of a ZeRO
flat partition. `FlatPartitions` tells the two kinds of tensors apart and cuts a flat partition
into pieces with the `lowbit.optim.zero.PartitionLayout` that ``zero.attach`` hands it.
"""
from __future__ import annotations

import torch

from . import kernels
from . import state as S
from ._device import upload


class Piece:
    """One original tensor as this rank sees it: the whole parameter, or its slice of a ZeRO flat
    partition (``length`` 0 where this rank holds none of it; its statistics still advance)."""

    def __init__(self, st, carrier, start, length, group, numel=None):
        self.st, self.carrier, self.start, self.length, self.group = st, carrier, start, length, group
        self.numel = length if numel is None else numel
        self.compute_dtype = S.compute_dtype(carrier)
        self.amax, self.sumsq, self.count, self.clip = 0.0, 0.0, 0, False
        self.grad = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.start is None else t.narrow(0, self.start, self.length)

    def grad_out(self) -> torch.Tensor:
        return self.view(self.carrier.grad)

    def grad_view(self) -> torch.Tensor:
        return self.grad_out().to(self.compute_dtype)


class LocalRows:
    """The pieces this rank holds elements of (``at``, their positions in `pieces`), and the map
    between tables with a row per such piece and tables with a row per piece, on `device` (the
    positions uploaded once, and not at all where the rank holds a slice of every piece)."""

    def __init__(self, pieces: list[Piece], device):
        self.at = [i for i, pc in enumerate(pieces) if pc.length]
        self.n, self.device = len(pieces), device
        self.idx = upload(self.at, torch.int64, device) if len(self.at) < self.n else None

    def pick(self, table: torch.Tensor) -> torch.Tensor:
        """The rows of `table` (a row per piece) of the local pieces."""
        return table if self.idx is None else table.index_select(0, self.idx)

    def spread(self, rows: torch.Tensor | None, width: int = 2) -> torch.Tensor:
        """[n, width] fp64 with `rows` (a row per local piece, None where there is none) at their
        pieces' positions and zeros elsewhere."""
        if self.idx is None and rows is not None:
            return rows.to(self.device)
        out = torch.zeros((self.n, width), dtype=torch.float64, device=self.device)
        return out if rows is None else out.index_copy_(0, self.idx, rows.to(self.device))


def by_carrier(pieces) -> dict:
    """id(carrier) -> (carrier, its pieces), in the order the carriers first appear."""
    out = {}
    for pc in pieces:
        out.setdefault(id(pc.carrier), (pc.carrier, []))[1].append(pc)
    return out


class FlatPartitions:
    """Mixin for an optimizer with per-tensor statistics: steps on the tensors it was given and on
    the flat partitions of a layout set by `set_partition_layout`, and refuses any other tensor.

    The optimizer is a `lowbit.optim._base.LowbitOptimizer` (its ``_clock`` counts a flat
    partition's steps) and provides ``state_dtype`` or its own ``_init_flat_state``; it keeps the
    statistics of each tensor in the piece's dict ``st``.
    """

    def set_partition_layout(self, layout) -> None:
        """Use `layout` (a `lowbit.optim.zero.PartitionLayout`, or None) to map the flat partitions
        DeepSpeed steps this optimizer on back to the original tensors. Called by `zero.attach`."""
        self._layout = layout

    def _is_flat(self, p) -> bool:
        layout = getattr(self, "_layout", None)
        return layout is not None and layout.covers(p)

    def _check_known(self, p) -> None:
        given = getattr(self, "_given", None)
        if given is not None and id(p) not in given and not self._is_flat(p):
            raise RuntimeError(
                f"{type(self).__name__}.step: a parameter this optimizer was not constructed with (a DeepSpeed "
                "ZeRO flat partition?). Per-tensor statistics would be computed over the whole partition; "
                "call lowbit.optim.zero.attach(engine) after deepspeed.initialize(...)")

    def _advance(self, group, params) -> tuple[int, list, list]:
        """Advance the group's global step; -> (the step T, the non-empty parameters of `params`,
        its flat partitions)."""
        flats = [p for p in params if self._is_flat(p)]
        plain = [p for p in params if p.numel() and not self._is_flat(p)]
        return self._clock(group, flats), plain, flats

    def _init_flat_state(self, fst, flat) -> None:
        """Start the elementwise state of a flat partition: Adam's two moments."""
        S.init_moment(fst, "exp_avg", flat, self.state_dtype)
        S.init_moment(fst, "exp_avg_sq", flat, self.state_dtype)

    def _pieces(self, group, plain, flats, T: int) -> list[Piece]:
        pieces = [Piece(self.state[p], p, None, p.numel(), None) for p in plain]
        for flat in flats:
            pieces += self._flat_pieces(group, flat, T)
        return pieces

    @staticmethod
    def _stat_table(pieces: list[Piece], local: LocalRows) -> torch.Tensor:
        """[len(pieces), 2] fp64: max |g| and sum g^2 of this rank's slice of each piece's gradient
        (zeros where it holds none), one kernel call for all; gives those pieces their gradient view
        (`grad`)."""
        for i in local.at:
            pieces[i].grad = pieces[i].grad_view()
        return local.spread(kernels.grad_stats([pieces[i].grad for i in local.at]) if local.at else None)

    def _flat_pieces(self, group, flat, T) -> list[Piece]:
        if flat.dtype != torch.float32:
            raise TypeError(f"params: ZeRO flat partitions are expected in fp32, got {flat.dtype}")
        fl = self._layout.flat(flat)
        fst = self.state[flat]
        if "tensors" not in fst:  # a dict per tensor for its statistics, filled by the optimizer
            fst["tensors"] = [{} for _ in fl.tensors]
            self._init_flat_state(fst, flat)
        if len(fst["tensors"]) != len(fl.tensors):
            raise RuntimeError(f"{type(self).__name__}: the state holds statistics of {len(fst['tensors'])} tensors "
                               f"for a partition of {len(fl.tensors)} (a checkpoint of another model or grouping?)")
        return [Piece(sc, flat, t.start, t.length, fl.group, t.numel)
                for sc, t in zip(fst["tensors"], fl.tensors) if t.numel]
