"""The Stable-SPAM step kernels (csrc/cuda/optim.cu), bit-exact with the spec in
`lowbit.backends.ref.optim`; used through `lowbit.optim.kernels`. Absent where the extension is.

The fused step's work table (which tensor and chunk each block of the launch updates) depends only
on the tensor sizes: it is built and uploaded once per layout of the parameter list (a ZeRO
partition's pieces included) and reused every step; a step then uploads only its per-tensor
pointers, in one copy the host does not wait for. The per-tensor scalars stay on the device: the
kernels read `optim_clip_stats`'s [n, 3] (clip, mh, r) table and `optim_adam_step`'s [n, 14]
`SCALARS` rows there (CUDA tensors on the gradients' device), so a step never syncs.
"""
from __future__ import annotations

from . import _native

MAX_LAYOUTS = 64  # a training run steps a handful of layouts (one per group or ZeRO sub-group)
_layouts: dict[tuple, object] = {}


def step_layout(params):
    """The device work table for tensors of the sizes of `params`, built on first use of that layout."""
    key = (params[0].device, tuple(p.numel() for p in params))
    table = _layouts.get(key)
    if table is None:
        if len(_layouts) >= MAX_LAYOUTS:  # sizes that change every step: keep the cache bounded
            _layouts.clear()
        table = _layouts[key] = _native._C.optim_step_layout(list(key[1]), params[0])
    return table


def adam_step(params, grads, ms, vs, scalars) -> None:
    """`scalars`: the [n, len(SCALARS)] fp64 table on the params' device (a row whose skip is set
    leaves its tensor untouched)."""
    _native._C.optim_adam_step(params, grads, ms, vs, scalars, step_layout(params))


if _native._C is not None and hasattr(_native._C, "optim_step_layout"):
    optim_grad_stats = _native._C.optim_grad_stats
    optim_clip_stats = _native._C.optim_clip_stats
    optim_adam_step = adam_step
