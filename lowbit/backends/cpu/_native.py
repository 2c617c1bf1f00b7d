"""The C++ / OpenMP extension `lowbit._C`, or the reason it cannot be imported."""
from __future__ import annotations

try:
    from ... import _C
    IMPORT_ERROR = None
except Exception as exc:  # no compiler at install time, or a broken build: fall back to ref
    _C = None
    IMPORT_ERROR = f"lowbit._C could not be imported ({type(exc).__name__}: {exc}); rebuild with `pip install -e .`"
