"""Backend registry: which module serves an op on which device, and why the others cannot.

Each backend is a module `lowbit.backends.<name>` that defines `devices()` (device types it runs
on), `unavailable()` (None, or the reason it cannot run here) and the op functions of
`ref.py` it implements (`quantize`, `dequantize`, `cast`, `hadamard`, `qmatmul`).
"""
from __future__ import annotations

import contextlib
import importlib

NAMES = ("ref", "cpu", "cuda", "triton")
OPS = ("quantize", "dequantize", "cast", "hadamard", "qmatmul")
AUTO_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}

# Innermost `use_backend` last. A plain list (not a ContextVar) so torch.compile can read it.
_requested: list[str] = []
_modules: dict[str, object] = {}


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {NAMES}")
    return name


def load(name: str):
    """The backend module, or None where it failed to import (see `why_unavailable`)."""
    check_name(name)
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except Exception as exc:  # a missing compiler or library must never break lowbit
            _modules[name] = exc
    mod = _modules[name]
    return None if isinstance(mod, Exception) else mod


def why_unavailable(name: str, op: str, device_type: str) -> str | None:
    """None if `name` can serve `op` on `device_type`, else the reason it cannot."""
    mod = load(name)
    if mod is None:
        return f"import failed: {_modules[name]}"
    reason = mod.unavailable()
    if reason:
        return reason
    if device_type not in mod.devices():
        return f"runs on {'/'.join(mod.devices()) or 'no device here'}, not {device_type}"
    if not hasattr(mod, op):
        return f"does not implement {op}"
    return None


def requested(backend: str | None = None) -> str:
    """The backend asked for: the explicit argument, else the innermost `use_backend`, else "auto"."""
    wanted = backend or (_requested[-1] if _requested else "auto")
    return wanted if wanted == "auto" else check_name(wanted)


def resolve(op: str, device_type: str, backend: str | None = None) -> str:
    """Pick the backend for `op` on `device_type`: explicit argument, then `use_backend`, then auto."""
    wanted = requested(backend)
    if wanted != "auto":
        check_name(wanted)
        reason = why_unavailable(wanted, op, device_type)
        if reason:
            raise RuntimeError(f"backend {wanted!r} cannot run {op} on {device_type}: {reason}")
        return wanted
    for name in AUTO_ORDER.get(device_type, ("ref",)):
        if why_unavailable(name, op, device_type) is None:
            return name
    return "ref"


def for_op(op: str, device_type: str, backend: str) -> object:
    """Resolve at run time (inside the custom op, never while tracing) and return the module."""
    return get(resolve(op, device_type, None if backend == "auto" else backend))


def get(name: str):
    """The backend module `name` (already resolved), or a RuntimeError saying why it cannot load."""
    mod = load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is unavailable: {_modules[name]}")
    return mod


@contextlib.contextmanager
def use_backend(name: str | None):
    """Route every lowbit op in this context to backend `name` (None restores automatic choice)."""
    _requested.append("auto" if name is None else check_name(name))
    try:
        yield
    finally:
        _requested.pop()
