"""The one loader of torch files (checkpoints, init_from): it names the file and never runs code."""
from __future__ import annotations

import os
import pickle
import re
import warnings

import torch

from ..errors import CheckpointError


def torch_error(path: str, e: BaseException) -> CheckpointError:
    text = str(e)
    hostile = re.search(r"GLOBAL ([\w.]+)", text)
    if hostile:
        return CheckpointError(f"{path}: refused: the file asks to import {hostile.group(1)}, so loading it could "
                               "run code; lowbit loads checkpoints only as tensors and plain containers")
    if isinstance(e, PermissionError):
        return CheckpointError(f"{path}: cannot read it ({e.strerror})")
    if isinstance(e, (EOFError, RuntimeError, OSError)) or "Weights only load failed" in text:
        reason = "empty" if isinstance(e, EOFError) else "not a complete torch file"
        return CheckpointError(f"{path}: damaged ({reason}); use an intact checkpoint "
                               "(`lowbit verify RUN_DIR` lists them)")
    return CheckpointError(f"{path}: cannot load ({type(e).__name__}: {text.splitlines()[0] if text else ''})")


def load_file(path: str, map_location=None):
    """``torch.load(path, weights_only=True)``; a missing, damaged or code-running file raises CheckpointError
    naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # garbled files trip it
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, AttributeError, KeyError,
            IndexError) as e:  # what torch's zip and pickle readers raise on a damaged file
        raise torch_error(path, e) from None
