"""Errors a user can fix, told apart from bugs.

The `lowbit` command prints an expected error as one line, ``lowbit <task>: <message>``, and exits 2;
anything else (a bug) keeps its traceback. ``--debug`` or ``LOWBIT_DEBUG=1`` shows the traceback of
expected errors too.
"""
from __future__ import annotations

import errno
import os


class UserError(Exception):
    """A problem in the user's input (config, data, checkpoint, run directory); the message names the
    key or file and what was expected."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, damaged, refused or does not fit the model."""


class RunDirError(UserError):
    """The run directory cannot be used as asked (held by another run, holds a run, not writable, full)."""


# OS errors that mean "this path / this disk", not "this program": reported as one line too
_FS_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
              errno.ENOTDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY}


def debug() -> bool:
    return os.environ.get("LOWBIT_DEBUG", "").lower() in ("1", "true", "yes", "on")


def expected(e: BaseException) -> bool:
    """Whether `e` is a user-fixable error (printed as one line) rather than a bug."""
    if isinstance(e, (UserError, FileNotFoundError, PermissionError)):
        return True
    return isinstance(e, OSError) and e.errno in _FS_ERRNOS


def describe(e: BaseException) -> str:
    """One line for an expected error."""
    if isinstance(e, OSError) and e.errno in _FS_ERRNOS and e.filename:
        where = f"{e.filename!r}" + (f" -> {e.filename2!r}" if e.filename2 else "")
        return f"cannot use {where}: {e.strerror or os.strerror(e.errno)}"
    return str(e)
