"""The backend registry: which backend serves an op on which device, and why the others cannot.

Every op family is resolved here. A backend is a package `lowbit.backends.<name>` with one module
per family (`quantize`, `hadamard`, `qmatmul`, `attention`, `optim`) holding that family's op
functions, with the signatures of the `ref` package, the executable spec. The package defines
`devices()` (the device types it runs on) and `unavailable()` (None, or why it cannot run here); a
family module may define its own `unavailable()` (the CPU attention runs without the extension).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch

NAMES = ("ref", "cpu", "cuda", "triton")
FAMILIES = {
    "quantize": ("quantize", "dequantize", "cast"),
    "quantize_dual": ("quantize_dual",),
    "hadamard": ("hadamard",),
    "qmatmul": ("qmatmul",),
    "attention": ("attention_with_block_pool", "block_sparse_attention"),
    "optim": ("optim_grad_stats", "optim_clip_stats", "optim_adam_step", "optim_lowprec_step"),
}
FAMILY_OF = {op: family for family, ops in FAMILIES.items() for op in ops}
OPS = FAMILIES["quantize"] + FAMILIES["hadamard"] + FAMILIES["qmatmul"]  # the tensor-format ops
ALL_OPS = tuple(FAMILY_OF)
AUTO_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}

# Innermost `use_backend` last. A plain list (not a ContextVar) so torch.compile can read it.
_requested: list[str] = []
_modules: dict[str, object] = {}


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {NAMES}")
    return name


def _import(path: str):
    """The module, or the exception that kept it from importing (cached either way)."""
    if path not in _modules:
        try:
            _modules[path] = importlib.import_module(path)
        except Exception as exc:  # a missing compiler or library must never break lowbit
            _modules[path] = exc
    return _modules[path]


def load(name: str):
    """The backend package, or None where it failed to import (see `why_unavailable`)."""
    mod = _import(f"{__name__}.{check_name(name)}")
    return None if isinstance(mod, Exception) else mod


def _family_module(name: str, family: str):
    """Backend `name`'s module for `family`, None where it has none, or the import exception."""
    path = f"{__name__}.{name}.{family}"
    if importlib.util.find_spec(path) is None:
        return None
    return _import(path)


def why_unavailable(name: str, op: str, device_type: str) -> str | None:
    """None if `name` can serve `op` on `device_type`, else the reason it cannot."""
    pkg = _import(f"{__name__}.{check_name(name)}")
    if isinstance(pkg, Exception):
        return f"import failed: {pkg}"
    if op not in FAMILY_OF:
        raise ValueError(f"op: unknown op {op!r}; expected one of {ALL_OPS}")
    mod = _family_module(name, FAMILY_OF[op])
    if mod is None:
        return f"does not implement {op}"
    if isinstance(mod, Exception):
        return f"import failed: {mod}"
    reason = (mod.unavailable if hasattr(mod, "unavailable") else pkg.unavailable)()
    if reason:
        return reason
    if device_type not in pkg.devices():
        return f"runs on {'/'.join(pkg.devices()) or 'no device here'}, not {device_type}"
    if not hasattr(mod, op):
        return f"does not implement {op}"
    return None


def implements(name: str, op: str) -> bool:
    """Whether backend `name` has code for `op` at all (on some device, built or not)."""
    mod = _family_module(check_name(name), FAMILY_OF[op])
    return mod is not None and not isinstance(mod, Exception) and hasattr(mod, op)


def requested(backend: str | None = None) -> str:
    """The backend asked for: the explicit argument, else the innermost `use_backend`, else "auto"."""
    wanted = backend or (_requested[-1] if _requested else "auto")
    return wanted if wanted == "auto" else check_name(wanted)


def resolve(op: str, device_type: str, backend: str | None = None) -> str:
    """Pick the backend for `op` on `device_type`: explicit argument, then `use_backend`, then auto."""
    wanted = requested(backend)
    if wanted != "auto":
        reason = why_unavailable(wanted, op, device_type)
        if reason:
            raise RuntimeError(f"backend {wanted!r} cannot run {op} on {device_type}: {reason}")
        return wanted
    for name in AUTO_ORDER.get(device_type, ("ref",)):
        if why_unavailable(name, op, device_type) is None:
            return name
    return "ref"


def get(name: str, op: str):
    """The function for `op` of backend `name` (already resolved)."""
    mod = _family_module(check_name(name), FAMILY_OF[op])
    if mod is None or isinstance(mod, Exception):
        raise RuntimeError(f"backend {name!r} cannot run {op}: {why_unavailable(name, op, 'cpu') or mod}")
    return getattr(mod, op)


def for_op(op: str, device_type: str, backend: str):
    """Resolve at run time (inside the custom op, never while tracing) and return the op function."""
    return get(resolve(op, device_type, None if backend == "auto" else backend), op)


def native_kernel(op: str, tensors, fp32: bool = True):
    """A native kernel for `op` on `tensors`, or None where the spec (PyTorch) code should run.

    Native kernels take contiguous tensors of one device, fp32 (``fp32=False``: any dtype, for ops
    whose caller has checked the dtypes). An explicit backend that cannot serve them is an error,
    as for the other ops; `use_backend("ref")` runs the spec.
    """
    if not tensors:
        return None
    dev = tensors[0].device.type
    wanted = requested()
    if wanted == "ref":
        return None
    fits = all((t.dtype == torch.float32 or not fp32) and t.is_contiguous()
               and t.device.type == dev for t in tensors)
    if wanted != "auto":
        reason = why_unavailable(wanted, op, dev)
        if reason:
            raise RuntimeError(f"backend {wanted!r} cannot run {op} on {dev}: {reason}")
        if not fits:
            raise RuntimeError(f"backend {wanted!r} runs {op} on contiguous fp32 tensors only")
        return get(wanted, op)
    if not fits:
        return None
    for name in AUTO_ORDER.get(dev, ()):
        if name != "ref" and why_unavailable(name, op, dev) is None:
            return get(name, op)
    return None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Route every lowbit op in this context to backend `name` (None restores automatic choice)."""
    _requested.append("auto" if name is None else check_name(name))
    try:
        yield
    finally:
        _requested.pop()
