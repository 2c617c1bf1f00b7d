"""What a process launcher (torchrun, deepspeed) hands a lowbit process: rank variables and a flag.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK; the deepspeed launcher also puts
``--local_rank=N`` in front of the program's own arguments (other launchers write ``--local-rank``
or the two-token ``--local_rank N``). The rank always comes from the environment, so the flag is
dropped before the command line is parsed.
"""
from __future__ import annotations

import os
import re

_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")
_LOCAL_RANK_EQ = re.compile(r"--local[_-]rank=\d+")


def ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) set by the launcher; (0, 1, 0) without one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def strip_launcher_args(argv: list[str]) -> list[str]:
    """argv without ``--local_rank=N``, ``--local-rank=N`` or ``--local_rank N`` (either spelling)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _LOCAL_RANK_FLAGS:
            skip = True
        elif not _LOCAL_RANK_EQ.fullmatch(a):
            out.append(a)
    return out
