"""Whether Triton can run here, and on which devices (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl

    IMPORT_ERROR = None
except Exception as exc:  # a missing or broken Triton must not break lowbit
    IMPORT_ERROR = f"triton is not importable: {exc}"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if _interpreted() else ("cuda",)


def unavailable() -> str | None:
    return IMPORT_ERROR


def _triton_interprets() -> bool:
    """Whether Triton's own library functions were built for the interpreter."""
    return type(tl.max).__name__ == "InterpretedFunction"


def check(*tensors: torch.Tensor) -> None:
    if IMPORT_ERROR:
        raise RuntimeError(f"triton backend: {IMPORT_ERROR}")
    for t in tensors:
        if t.device.type not in devices():
            raise RuntimeError(f"triton backend: tensors on {t.device.type} need "
                               f"{'a CUDA device' if t.device.type != 'cpu' else 'TRITON_INTERPRET=1'}")
        if t.device.type == "cpu" and not _triton_interprets():
            raise RuntimeError("triton backend: TRITON_INTERPRET=1 was set after triton was imported; "
                               "Triton reads it at import, so set it before anything imports triton")
