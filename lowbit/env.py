"""`python -m lowbit.env`: which backend serves each op on each device, and why the others cannot."""
from __future__ import annotations

import platform

import torch

from . import backends


def report() -> str:
    lines = [f"lowbit on {platform.machine()} / python {platform.python_version()} / torch {torch.__version__}"
             f" (cuda {'available' if torch.cuda.is_available() else 'not available'})", ""]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"device {device}:")
        for op in backends.OPS:
            chosen = backends.resolve(op, device)
            lines.append(f"  {op:<11} -> {chosen}")
            for name in backends.NAMES:
                if name == chosen:
                    continue
                reason = backends.why_unavailable(name, op, device)
                lines.append(f"      {name:<7} {'available (lower priority)' if reason is None else reason}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
