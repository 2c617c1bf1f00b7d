"""The machine's name, for result folders and reports: the GPU model, or the CPU model and core count."""
from __future__ import annotations

import os
import platform
import re

import torch


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str = "cpu") -> str:
    """Directory name for results: the GPU model name, or the CPU model name plus the core count."""
    if device == "cuda" and torch.cuda.is_available():
        return slug(torch.cuda.get_device_name(0))
    return f"{slug(cpu_model())}-{os.cpu_count()}c"
