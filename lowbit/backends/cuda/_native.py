"""The CUDA extension `lowbit._C_cuda`, or the exception that kept it from importing."""
from __future__ import annotations

import importlib

try:
    _C = importlib.import_module("lowbit._C_cuda")
    IMPORT_ERROR: Exception | None = None
except Exception as exc:  # not built (CPU-only torch, no nvcc) or built for another torch
    _C = None
    IMPORT_ERROR = exc
