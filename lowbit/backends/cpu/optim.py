"""The Stable-SPAM step kernels (csrc/cpu/optim.cpp, optim_lowprec.cpp), bit-exact with the spec in
`lowbit.backends.ref.optim`; used through `lowbit.optim.kernels`. Absent where the extension is.
The spec's signatures: `optim_clip_stats(grads, table)` with the [n, 3] fp64 (clip, mh, r) table and
`optim_adam_step(..., scalars)` with the [n, 14] fp64 `SCALARS` rows, CPU tensors both;
`optim_lowprec_step`'s scalars are [P, 15] (`SCALARS`, then zero_after)."""
from __future__ import annotations

from ._native import _C

if _C is not None and hasattr(_C, "optim_adam_step"):
    optim_grad_stats = _C.optim_grad_stats
    optim_clip_stats = _C.optim_clip_stats
    optim_adam_step = _C.optim_adam_step

if _C is not None and hasattr(_C, "optim_lowprec_step"):
    optim_lowprec_step = _C.optim_lowprec_step
