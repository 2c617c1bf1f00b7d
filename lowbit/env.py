"""`python -m lowbit.env`: which backend serves each op family on each device, and why the others cannot."""
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
        for family, ops in backends.FAMILIES.items():
            lines.append(f"  [{family}]")
            for op in ops:
                lines.extend(_op_lines(op, device))
    return "\n".join(lines)


def _op_lines(op: str, device: str) -> list[str]:
    chosen = backends.resolve(op, device)
    # the fused low-precision optimizer step has no ref kernel: its spec is the unfused composition
    note = "  (no fused kernel: the unfused spec path runs)" if backends.why_unavailable(chosen, op, device) else ""
    lines = [f"  {op:<25} -> {chosen}{note}"]
    for name in backends.NAMES:
        if name != chosen:
            reason = backends.why_unavailable(name, op, device)
            lines.append(f"      {name:<7} {'available (lower priority)' if reason is None else reason}")
    return lines


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
