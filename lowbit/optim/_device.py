"""Small host tables (indices, rows of a saved state) onto a device without the host waiting for it."""
from __future__ import annotations

import torch


def upload(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` as a tensor on `device`. To a GPU through pinned memory and a non-blocking copy: a
    plain copy from pageable memory would wait for the device (a host sync in the training step)."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
