"""The launch limits every Triton launcher here keeps to, whatever the tensor shape and GPU.

CUDA caps grid axis 0 at 2^31 - 1 programs and axes 1 and 2 at 65535, so a count of programs that
grows with a tensor dimension goes on axis 0; a 2-D tiling is flattened onto it (program p takes
tile (p // n_cols, p % n_cols)). Shared memory per block (the opt-in maximum) differs by GPU: the
launchers whose tiles could exceed it size them from a static estimate against the device's
limit, and the others stay under the smallest limit of the GPUs lowbit builds for.
"""
from __future__ import annotations

import functools

import torch

MAX_GRID = (2**31 - 1, 65535, 65535)
# Opt-in shared memory per block (bytes) of the GPU targets setup.py builds by default.
SMEM_OPTIN = {"sm_80": 166912, "sm_89": 101376, "sm_90a": 232448, "sm_100a": 232448, "sm_120a": 101376}
SMEM_MIN = min(SMEM_OPTIN.values())


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on `device`; the interpreter (CPU) takes the smallest target's."""
    if device.type != "cuda":
        return SMEM_MIN
    return _device_smem(device.index if device.index is not None else torch.cuda.current_device())
