"""CUDA backend: the kernels of `lowbit._C_cuda` (csrc/cuda/*.cu), bit-exact with `lowbit.backends.ref`.

quantize / dequantize / cast / hadamard run lowbit's own kernels and give the same bits as the
reference on every format, rounding, block and input dtype; `qmatmul` picks a GEMM path
(`qmatmul.py`). Importing this package never needs a GPU or the compiled extension:
`unavailable()` then says why. It also says why where the extension holds no code for the GPU
(`runs_on`: built for other archs, without PTX it could JIT), so that the registry falls back to
triton, then ref, instead of every op failing with "no kernel image is available".
"""
from __future__ import annotations

import warnings

import torch

from . import _native
from ._native import IMPORT_ERROR, _C  # noqa: F401
from .hadamard import hadamard  # noqa: F401
from .qmatmul import qmatmul  # noqa: F401
from .quantize import cast, dequantize, quantize  # noqa: F401

_PROBED: dict[int, str | None] = {}  # device index -> why the extension cannot run there (None: it can)


def devices() -> tuple[str, ...]:
    return ("cuda",)


def built_archs() -> tuple[str, ...]:
    """The targets the extension holds code for ("sm_90a", "compute_80", ...); () where it does not say."""
    archs = getattr(_native._C, "archs", None)
    return tuple(a for a in archs().split("+") if a) if archs else ()


def _target(arch: str) -> tuple[str, int, int, str]:
    """"sm_90a" -> ("sm", 9, 0, "a"); "compute_80" -> ("compute", 8, 0, "")."""
    kind, _, name = arch.partition("_")
    suffix = name[-1] if name[-1] in "af" else ""
    major, minor = divmod(int(name.rstrip("af")), 10)
    return kind, major, minor, suffix


def runs_on(capability: tuple[int, int], archs) -> bool:
    """Whether code for `archs` runs on a GPU of `capability`, by CUDA's compatibility rules: SASS sm_XY
    on X.Y' for Y' >= Y (same major); arch-specific sm_XYa only on X.Y, family-specific sm_XYf on the
    same major from Y on; PTX compute_XY on any capability >= X.Y (the driver JIT-compiles it)."""
    for arch in archs:
        kind, major, minor, suffix = _target(arch)
        if suffix == "a":
            ok = tuple(capability) == (major, minor)
        elif kind == "sm" or suffix == "f":
            ok = capability[0] == major and capability[1] >= minor
        else:
            ok = tuple(capability) >= (major, minor)
        if ok:
            return True
    return False


def _probe(index: int) -> str | None:
    archs = built_archs()
    capability = tuple(torch.cuda.get_device_capability(index))
    if not archs or runs_on(capability, archs):
        return None
    major, minor = capability
    reason = (f"lowbit._C_cuda holds no code for {torch.cuda.get_device_name(index)} (compute capability "
              f"{major}.{minor}): it was built for {', '.join(archs)}; rebuild it with "
              f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}{'a' if major >= 9 else ''}\" "
              "pip install --no-build-isolation -e .")
    warnings.warn(f"lowbit: {reason}. Its ops run on the triton backend, or ref without Triton.",
                  RuntimeWarning, stacklevel=2)
    return reason


def unavailable() -> str | None:
    if _native._C is None:
        return (f"the CUDA extension lowbit._C_cuda is not built ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}); "
                "`pip install` builds it when torch has CUDA and nvcc is found")
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    index = torch.cuda.current_device()
    if index not in _PROBED:  # asked before every op: once per device, and the warning with it
        _PROBED[index] = _probe(index)
    return _PROBED[index]
