"""Benchmark harness: timers, percentiles, the machine's limits, CSV, console table and PNG.

Timing: `torch.utils.benchmark.Timer`, `warmup` untimed calls, then `blocked_autorange` blocks until
`min_runs` samples and `min_time` seconds are both reached; p20/p50/p80 are taken over those
samples (linear interpolation between order statistics, as numpy does). The Timer synchronizes
CUDA around each block, so GPU times are complete.

Machine limits, measured once per `lowbit bench` run in the same process as the ops, so ratios
compare like with like (`Limits.measure`):
  * `copy_GB/s`: `Tensor.copy_` of a buffer much larger than the caches, counted as read + write bytes;
  * `fp32_mm_TFLOP/s`: fp32 `torch.mm` of square matrices, 2 n^3 flops;
  * on a GPU whose datasheet is in `DATASHEETS`, also `peak_bf16_TFLOP/s`, `peak_fp8_TFLOP/s`,
    `peak_fp4_TFLOP/s` (dense) and `peak_mem_GB/s`.

Timings on a shared machine are noisy: compare ratios from one run, never absolute times across runs.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils import benchmark

from ..machine import machine_name, slug  # noqa: F401  (machine_name is re-exported: results folders are named by it)

ABSENT = "absent"  # the peer library is not installed
NOT_APPLICABLE = "n/a"  # the peer has no such op (or not on this device)

# Dense (no sparsity) datasheet peaks: TFLOP/s per element type and memory GB/s.
DATASHEETS = {
    "h100-sxm": {"peak_bf16_TFLOP/s": 989.0, "peak_fp8_TFLOP/s": 1979.0, "peak_mem_GB/s": 3350.0},
    "h100-pcie": {"peak_bf16_TFLOP/s": 756.0, "peak_fp8_TFLOP/s": 1513.0, "peak_mem_GB/s": 2000.0},
    "h100-nvl": {"peak_bf16_TFLOP/s": 835.0, "peak_fp8_TFLOP/s": 1671.0, "peak_mem_GB/s": 3900.0},
    "h200": {"peak_bf16_TFLOP/s": 989.0, "peak_fp8_TFLOP/s": 1979.0, "peak_mem_GB/s": 4800.0},
    "b200": {"peak_bf16_TFLOP/s": 2250.0, "peak_fp8_TFLOP/s": 4500.0, "peak_fp4_TFLOP/s": 9000.0,
             "peak_mem_GB/s": 8000.0},
    "a100": {"peak_bf16_TFLOP/s": 312.0, "peak_mem_GB/s": 2039.0},
}


def percentile(samples: Iterable[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("samples: expected at least one value")
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected a percentile in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    label: str
    samples: list[float] = field(default_factory=list)  # seconds per call

    @property
    def p20(self) -> float:
        return percentile(self.samples, 20)

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p80(self) -> float:
        return percentile(self.samples, 80)

    def gbps(self, nbytes: float) -> float:
        return nbytes / self.p50 / 1e9

    def tflops(self, flops: float) -> float:
        return flops / self.p50 / 1e12


def time_fn(fn: Callable[[], object], label: str = "", *, warmup: int = 1, min_runs: int = 5,
            min_time: float = 0.5) -> Timing:
    """Time `fn()` (a closure over its inputs) with `torch.utils.benchmark.Timer.blocked_autorange`.

    `warmup` untimed calls first; then blocks of calls until at least `min_time` seconds were
    measured and at least `min_runs` blocks were taken. Each sample is one block's time per call
    (a block is a single call for anything slower than about min_time / 20).
    """
    if min_runs < 1:
        raise ValueError(f"min_runs: expected at least 1, got {min_runs}")
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, num_threads=torch.get_num_threads())
    for _ in range(warmup):
        fn()
    t = Timing(label)
    while len(t.samples) < min_runs:
        t.samples.extend(timer.blocked_autorange(min_run_time=min_time).times)
    return t


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is zero."""
    if num is None or den is None or den == 0 or (isinstance(num, float) and math.isnan(num)):
        return None
    return num / den


def copy_bandwidth(nbytes: int = 256 << 20, device: str = "cpu", **kw) -> tuple[Timing, float]:
    """`Tensor.copy_` of an `nbytes` buffer: (timing, GB/s counting read + write)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), "copy_", **kw)
    return t, t.gbps(2 * nbytes)


def fp32_gemm_throughput(n: int = 2048, device: str = "cpu", **kw) -> tuple[Timing, float]:
    """fp32 `torch.mm` of n x n matrices: (timing, TFLOP/s)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    t = time_fn(lambda: torch.mm(a, b), "fp32 mm", **kw)
    return t, t.tflops(2 * n**3)


def datasheet(gpu_name: str) -> dict[str, float]:
    """Datasheet peaks of a GPU from its `torch.cuda.get_device_name()`, or {} when unknown."""
    s = slug(gpu_name)
    for key in sorted(DATASHEETS, key=len, reverse=True):
        parts = key.split("-")
        if all(p in s.split("-") for p in parts):
            return dict(DATASHEETS[key])
    if "h100" in s.split("-"):  # plain "NVIDIA H100" / "H100 80GB HBM3" is the SXM part
        return dict(DATASHEETS["h100-sxm"])
    return {}


@dataclass
class Limits:
    """The machine's limits for this run: name -> value, and the timings behind the measured ones."""
    values: dict[str, float]
    timings: dict[str, Timing] = field(default_factory=dict)
    sizes: dict[str, str] = field(default_factory=dict)

    UNIT = {"copy_GB/s": "GB/s", "fp32_mm_TFLOP/s": "TFLOP/s", "peak_bf16_TFLOP/s": "TFLOP/s",
            "peak_fp8_TFLOP/s": "TFLOP/s", "peak_fp4_TFLOP/s": "TFLOP/s", "peak_mem_GB/s": "GB/s"}

    @classmethod
    def measure(cls, device: str = "cpu", quick: bool = False, **kw) -> "Limits":
        copy_bytes = (64 << 20) if quick else (512 << 20)
        if device == "cuda":
            copy_bytes *= 4
        n = 1024 if quick else (8192 if device == "cuda" else 2048)
        ct, gbps = copy_bandwidth(copy_bytes, device, **kw)
        mt, tflops = fp32_gemm_throughput(n, device, **kw)
        values = {"copy_GB/s": gbps, "fp32_mm_TFLOP/s": tflops}
        if device == "cuda" and torch.cuda.is_available():
            values.update(datasheet(torch.cuda.get_device_name(0)))
        return cls(values, {"copy_GB/s": ct, "fp32_mm_TFLOP/s": mt},
                   {"copy_GB/s": f"{copy_bytes} bytes", "fp32_mm_TFLOP/s": f"{n}x{n}x{n}"})

    def get(self, name: str | None) -> float | None:
        return None if name is None else self.values.get(name)


def repo_root() -> Path | None:
    """The lowbit source checkout holding `bench/` (current directory first, then this package's)."""
    candidates = [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]]
    for d in candidates:
        if (d / "bench").is_dir() and (d / "lowbit" / "bench").is_dir() and (d / "pyproject.toml").is_file():
            return d
    return None


def results_dir(machine: str, out: Path | str | None = None) -> Path:
    """`out` when given; else `<repo>/bench/results/<machine>` in a checkout; else `./lowbit-bench/<machine>`."""
    if out is not None:
        d = Path(out)
    else:
        root = repo_root()
        d = (root / "bench" / "results" / machine) if root else (Path.cwd() / "lowbit-bench" / machine)
    d.mkdir(parents=True, exist_ok=True)
    return d


def fmt_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> Path:
    """Rows as CSV with exactly `fields` as columns (a row with other keys is an error)."""
    for r in rows:
        extra = set(r) - set(fields)
        if extra:
            raise ValueError(f"rows: keys {sorted(extra)} are not columns of this CSV")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="raise")
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt_cell(r.get(k)) for k in fields})
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bar_chart(path: Path, title: str, labels: list[str], series: dict[str, list[float | None]],
              ylabel: str, hline: float | None = None, log: bool = False) -> str:
    """Horizontal grouped bars, one group per label; returns a note (written, or why not)."""
    try:  # optional and slow to import: the CSV is written without it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: {path.name} not written"
    n = len(labels)
    k = max(1, len(series))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * n * k + 1.2)))
    h = 0.8 / k
    for j, (name, vals) in enumerate(series.items()):
        ys = [i + (j - (k - 1) / 2) * h for i in range(n)]
        ax.barh(ys, [v if v is not None else 0 for v in vals], height=h, label=name)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    if hline is not None:
        ax.axvline(hline, color="k", lw=0.8, ls="--")
    ax.set_xlabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path.name}"
