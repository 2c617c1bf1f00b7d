"""The Stable-SPAM step and its per-tensor statistics, on the backend the registry picks.

The arithmetic is specified exactly in `lowbit.backends.ref.optim` (the spec, in PyTorch); the
native kernels (`lowbit.backends.cpu.optim`, `lowbit.backends.cuda.optim`) give the same bits.
Native kernels take contiguous fp32 tensors of one device; anything else runs the spec.
Moments stored in bf16 / fp8 / int8 (`lowprec_step`): the same step between a decode and an
encode of the moments; its spec is that composition, ``state.load_moments`` (the first moment
zeroed where the second decodes to 0), the step above, zeroing after the update where asked
(compat="official" resets), ``state.store_moment``. The native kernel does it block by block.
"""
from __future__ import annotations

import torch

from .. import backends
from ..backends.ref import optim as spec
from ..backends.ref.optim import SCALARS, clipped, f32, sumsq_spec  # noqa: F401  (the spec's names, re-exported)


def _native(op: str, tensors, fp32: bool = True):
    """The native function for `op`, or None when the spec should run (see `backends.native_kernel`)."""
    return backends.native_kernel(op, tensors, fp32)


def grad_stats(grads: list[torch.Tensor]) -> torch.Tensor:
    """[n, 2] fp64 on the gradients' device: (max |g|, sum g^2) per tensor; max |g| is +inf where the
    tensor holds NaN or Inf."""
    fn = _native("optim_grad_stats", grads)
    return spec.grad_stats(grads) if fn is None else fn(grads)


def clip_stats(grads: list[torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """[n, 2] fp64 on the gradients' device: (sum of the clipped values squared, number of clipped
    entries) per tensor; ``table[i] = (clip, mh, r)`` (fp64 on that device, mh and r fp32-exact);
    (0, 0) where clip is 0."""
    fn = _native("optim_clip_stats", grads)
    return spec.clip_stats(grads, table) if fn is None else fn(grads, table)


def adam_step(params, grads, ms, vs, scalars: torch.Tensor, foreach: bool = True) -> None:
    """One elementwise step per tensor, in place on params, ms, vs; grads are read only.

    ``scalars`` is the [n, len(SCALARS)] fp64 table on the tensors' device, each value fp32-exact
    where the tensor computes in fp32; a row whose ``skip`` is set leaves its tensor untouched.
    """
    if not params:
        return
    fn = _native("optim_adam_step", list(params) + list(grads) + list(ms) + list(vs))
    if fn is None:
        spec.adam_step(params, grads, ms, vs, scalars, foreach)
    else:
        fn(params, grads, ms, vs, scalars)


MAX_LAYOUTS = 64
_piece_tables: dict[tuple, torch.Tensor] = {}


def piece_table(pieces) -> torch.Tensor:
    """The [n, 3] int64 table of `pieces`: the same every step for one layout of the parameters (and
    ZeRO partition), so built once per layout and reused (bounded, for layouts that keep changing)."""
    key = tuple(tuple(p) for p in pieces)
    table = _piece_tables.get(key)
    if table is None:
        if len(_piece_tables) >= MAX_LAYOUTS:
            _piece_tables.clear()
        table = _piece_tables[key] = torch.tensor(key, dtype=torch.int64).reshape(-1, 3)
    return table


def lowprec_step(state_dtype: str, params, ms, m_scales, vs, v_scales, grads, pieces, scalars, seeds,
                 books) -> bool:
    """The elementwise step on moments stored in `state_dtype` ("bf16", "fp8", "int8"), fused with
    their decode and encode, in place; False (nothing done) where no native kernel serves it, and
    the caller runs the spec: ``state.load_moments``, `adam_step`, ``state.store_moment``.

    The result is that path's, bit for bit. Per carrier c (a parameter or a ZeRO flat partition,
    contiguous fp32): ``ms[c]`` / ``vs[c]`` and, for fp8 / int8, ``m_scales[c]`` / ``v_scales[c]``
    as `lowbit.optim.state` stores them; ``seeds[c]`` the stochastic-rounding seeds of (m, v).
    Per piece i (``pieces[i] = (carrier, start, length)``, non-overlapping): ``grads[i]`` (fp32,
    `length` elements) and ``scalars[i]`` (the values of `SCALARS`, then 1.0 where the moments
    are zeroed after the update); a piece whose ``skip`` is set is not stepped, and a carrier
    all of whose pieces skip keeps its parameter and stored moments. ``books``: for int8 the
    code books and midpoints of both moments (``state.int8_books()``), else empty.
    """
    if not params:
        return True
    wanted = backends.requested()
    if wanted not in ("auto", "ref") and not backends.implements(wanted, "optim_lowprec_step"):
        return False  # the unfused path runs that backend's `adam_step`
    tensors = list(params) + list(ms) + list(vs) + list(m_scales) + list(v_scales) + list(grads)
    fn = _native("optim_lowprec_step", tensors, fp32=False)
    if fn is None:
        return False
    fn(state_dtype, list(params), list(ms), list(m_scales), list(vs), list(v_scales), list(grads),
       piece_table(pieces),
       torch.as_tensor(scalars, dtype=torch.float64).reshape(-1, len(SCALARS) + 1).contiguous(),
       torch.tensor(seeds, dtype=torch.int64).reshape(-1, 2), list(books))
    return True
