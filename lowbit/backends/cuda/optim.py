"""The Stable-SPAM step kernels (csrc/cuda/optim.cu), bit-exact with the spec in
`lowbit.backends.ref.optim`; used through `lowbit.optim.kernels`. Absent where the extension is."""
from __future__ import annotations

from ._native import _C

if _C is not None and hasattr(_C, "optim_adam_step"):
    optim_grad_stats = _C.optim_grad_stats
    optim_clip_stats = _C.optim_clip_stats
    optim_adam_step = _C.optim_adam_step
