"""The suite interface: `Row` (one timed case), `Context` (one `lowbit bench` run), and `finish`
(flatten a suite's rows into the common CSV schema, print the console table, write CSV and PNG).

See the `lowbit.bench` package docstring for the contract a suite module follows.
"""
from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import backends
from . import harness, shapes
from .harness import ABSENT, NOT_APPLICABLE, Limits, Timing

UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0, "steps/s": 1.0}
HEAD = ["machine", "device", "suite", "case", "backend", "dtype", "shape"]
MEASURED = ["p20_ms", "p50_ms", "p80_ms", "work", "unit", "rate", "limit", "limit_value", "ratio_to_limit"]


@dataclass
class Row:
    """One timed case of a suite: lowbit's timing plus each peer's timing of the same work.

    case    short label, unique within the suite's rows (e.g. "nvfp4 nearest rht16")
    timing  lowbit's `Timing`, or None when the case was not run (say why in `note`)
    work    bytes moved (unit "GB/s") or flops (unit "TFLOP/s") or tokens / steps per call
    limit   which `ctx.limits` value `rate` is compared with ("copy_GB/s", "fp32_mm_TFLOP/s",
            "peak_bf16_TFLOP/s", ...); its unit must equal `unit`; None for no ratio
    peers   peer name -> its `Timing` of the same work, or a status string: `NOT_APPLICABLE` (the
            peer has no such op here) or a short reason ("skipped: ..."). Peers whose package is not
            installed are filled in as `ABSENT` by the harness; a declared peer missing here is n/a.
    params  the suite's own columns (keys of the module's PARAMS), e.g. format, rounding, peak_mib
    backend the lowbit backend that served the case (default: `ctx.backend` or "auto")
    """
    case: str
    timing: Timing | None
    shape: str = ""
    dtype: str = ""
    work: float | None = None
    unit: str = ""
    limit: str | None = None
    peers: dict[str, Timing | str] = field(default_factory=dict)
    params: dict[str, object] = field(default_factory=dict)
    backend: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.unit and self.unit not in UNITS:
            raise ValueError(f"unit: expected one of {list(UNITS)}, got {self.unit!r}")
        if self.limit is not None and Limits.UNIT.get(self.limit, self.unit) != self.unit:
            raise ValueError(f"limit: {self.limit} is in {Limits.UNIT[self.limit]}, but this row's unit is {self.unit!r}")

    @property
    def rate(self) -> float | None:
        if self.timing is None or self.work is None or not self.unit:
            return None
        return self.work / self.timing.p50 / UNITS[self.unit]


@dataclass
class Context:
    """Everything a suite needs from one `lowbit bench` run.

    device   "cpu" or "cuda"
    backend  the lowbit backend asked for with --backend (None: lowbit's automatic choice)
    shapes   model names from --shapes (empty: each suite's default); use `ctx.models(...)`
    tokens   rows M of activations (--tokens; default shapes.TOKENS, or shapes.QUICK_TOKENS with --quick)
    quick    --quick: small shapes and short timings, seconds per suite
    short    short timings at full shapes (--gpu-quick, whose shapes come in through `shapes`)
    out      output directory (--out, else bench/results/<machine>/ in a checkout)
    limits   the machine's limits, measured once at the start of the run
    """
    device: str
    machine: str
    backend: str | None
    shapes: list[str]
    tokens: int
    quick: bool
    out: Path
    limits: Limits
    console: Callable[[str], None] = print
    short: bool = False

    @property
    def timer_kw(self) -> dict:
        short = self.quick or self.short
        return dict(warmup=1, min_runs=3 if short else 5, min_time=0.2 if short else 1.0)

    def time(self, fn: Callable[[], object], label: str = "", **overrides) -> Timing:
        """`harness.time_fn` with this run's settings (quick or full); keyword overrides win."""
        return harness.time_fn(fn, label, **{**self.timer_kw, **overrides})

    def models(self, default: tuple[str, ...], quick: tuple[str, ...] | None = None) -> list[shapes.ModelShape]:
        """--shapes if given, else `quick` (with --quick) or `default`."""
        return shapes.select(self.shapes, quick if (self.quick and quick) else default)

    def backend_for(self, op: str) -> str:
        """The lowbit backend that will serve `op` on this device (resolving --backend or auto)."""
        return backends.resolve(op, self.device, self.backend)

    @staticmethod
    def installed(module: str | None) -> bool:
        """Whether a peer's package imports here (None: always, e.g. torch itself)."""
        if module is None:
            return True
        try:
            importlib.import_module(module)
            return True
        except Exception:
            return False


def columns(module) -> list[str]:
    """The CSV columns of a suite module: common head, its PARAMS, measurements, peer pairs, note."""
    peer_cols = [c for p in getattr(module, "PEERS", {}) for c in (f"{p}_p50_ms", f"speedup_vs_{p}")]
    return HEAD + list(getattr(module, "PARAMS", ())) + MEASURED + peer_cols + ["note"]


def limit_records(ctx: Context, suite: str) -> list[dict]:
    """The limits measured for this run, as CSV records (case "limit <name>")."""
    out = []
    for name, value in ctx.limits.values.items():
        t = ctx.limits.timings.get(name)
        out.append(dict(machine=ctx.machine, device=ctx.device, suite=suite, case=f"limit {name}",
                        backend="torch" if t else "datasheet", shape=ctx.limits.sizes.get(name, ""),
                        p20_ms=t.p20 * 1e3 if t else None, p50_ms=t.p50 * 1e3 if t else None,
                        p80_ms=t.p80 * 1e3 if t else None, unit=Limits.UNIT[name], rate=value,
                        note="measured at the start of this run" if t else "datasheet peak (dense)"))
    return out


def record(row: Row, module, ctx: Context, suite: str) -> dict:
    """One Row flattened into the suite's CSV columns, with ratios computed against ctx.limits."""
    params = getattr(module, "PARAMS", ())
    extra = set(row.params) - set(params)
    if extra:
        raise ValueError(f"{suite}: row {row.case!r} has params {sorted(extra)} that are not in PARAMS")
    t = row.timing
    limit_value = ctx.limits.get(row.limit)
    rec = dict(machine=ctx.machine, device=ctx.device, suite=suite, case=row.case,
               backend=row.backend or ctx.backend or "auto", dtype=row.dtype, shape=row.shape,
               p20_ms=t.p20 * 1e3 if t else None, p50_ms=t.p50 * 1e3 if t else None,
               p80_ms=t.p80 * 1e3 if t else None, work=row.work, unit=row.unit, rate=row.rate,
               limit=row.limit or "", limit_value=limit_value, ratio_to_limit=harness.ratio(row.rate, limit_value),
               note=row.note)
    rec.update(row.params)
    for peer, package in getattr(module, "PEERS", {}).items():
        val = row.peers.get(peer, NOT_APPLICABLE)
        if not ctx.installed(package):
            val = ABSENT
        if isinstance(val, Timing):
            rec[f"{peer}_p50_ms"] = val.p50 * 1e3
            rec[f"speedup_vs_{peer}"] = harness.ratio(val.p50, t.p50) if t else None
        else:
            rec[f"{peer}_p50_ms"] = rec[f"speedup_vs_{peer}"] = str(val)
    return rec


def stem(suite: str, ctx: Context) -> str:
    s = suite + ("-quick" if ctx.quick else "-gpu-quick" if ctx.short else "")
    return s + (f"-{ctx.backend}" if ctx.backend else "")


def console_table(suite: str, records: list[dict], peers: list[str], print_fn=print) -> None:
    """The suite's results as a rich table (plain text where rich is not installed)."""
    cols = ["case", "shape", "p50 ms", "rate", "of limit"] + [f"vs {p}" for p in peers]

    def cells(r):
        rate = f"{harness.fmt_cell(r['rate'])} {r['unit']}" if r.get("rate") is not None else ""
        lim = f"{100 * r['ratio_to_limit']:.1f} %" if r.get("ratio_to_limit") is not None else ""
        out = [r["case"], r.get("shape", ""), harness.fmt_cell(r.get("p50_ms")), rate, lim]
        for p in peers:
            v = r.get(f"speedup_vs_{p}")
            out.append(f"{v:.2f}x" if isinstance(v, float) else harness.fmt_cell(v))
        return out

    try:  # optional: a plain table without it
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_fn(f"== {suite} ==")
        print_fn(" | ".join(cols))
        for r in records:
            print_fn(" | ".join(cells(r)))
        return
    table = Table(title=f"lowbit bench {suite}  (speedup vs peer = peer p50 / lowbit p50)")
    for c in cols:
        table.add_column(c, justify="left" if c in ("case", "shape") else "right")
    for r in records:
        table.add_row(*cells(r))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def markdown(records: list[dict]) -> str:
    """A results CSV (as read by `harness.read_csv`) as a markdown table: the limits, then one row per case."""
    if not records:
        raise ValueError("records: the CSV holds no rows")
    peers = [c[len("speedup_vs_"):] for c in records[0] if c.startswith("speedup_vs_")]
    limits = [r for r in records if r["case"].startswith("limit ")]
    out = ["Limits: " + ", ".join(f"{r['case'][6:]} {float(r['rate']):.4g}" for r in limits) + ".", "",
           "| case | shape | dtype | p50 ms | rate | of limit | " + " | ".join(f"vs {p}" for p in peers) + " |",
           "|---" * (6 + len(peers)) + "|"]

    def num(v, spec, suffix=""):
        try:
            return f"{float(v):{spec}}{suffix}"
        except (TypeError, ValueError):
            return v or ""
    for r in records:
        if r["case"].startswith("limit "):
            continue
        rate = f"{num(r['rate'], '.4g')} {r['unit']}" if r.get("rate") else ""
        lim = num(100 * float(r["ratio_to_limit"]), ".1f", " %") if r.get("ratio_to_limit") else ""
        cells = [r["case"], r["shape"], r["dtype"], num(r["p50_ms"], ".3g"), rate, lim]
        cells += [num(r[f"speedup_vs_{p}"], ".2f", "x") for p in peers]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def default_plot(path: Path, suite: str, records: list[dict], peers: list[str]) -> str:
    """Bars per case: the fraction of the machine limit, and the speedup over each timed peer."""
    rows = [r for r in records if r.get("p50_ms") is not None and not r["case"].startswith("limit ")]
    if not rows:
        return f"nothing timed: {path.name} not written"
    labels = [f"{r['case']} {r['shape']}" for r in rows]
    series = {"fraction of the machine limit": [r.get("ratio_to_limit") for r in rows]}
    for p in peers:
        vals = [r.get(f"speedup_vs_{p}") for r in rows]
        if any(isinstance(v, float) for v in vals):
            series[f"speedup vs {p}"] = [v if isinstance(v, float) else None for v in vals]
    machine = rows[0]["machine"]
    return harness.bar_chart(path, f"lowbit bench {suite} on {machine} (dashed: 1.0)", labels, series,
                             "ratio (higher is better for lowbit)", hline=1.0)


def finish(suite: str, module, rows: list[Row], ctx: Context) -> tuple[Path, list[dict]]:
    """Flatten, print, write `<out>/<suite>[-quick][-backend].csv` and `.png`; returns (csv path, records)."""
    records = limit_records(ctx, suite) + [record(r, module, ctx, suite) for r in rows]
    peers = list(getattr(module, "PEERS", {}))
    console_table(suite, [r for r in records if not r["case"].startswith("limit ")], peers, ctx.console)
    base = ctx.out / stem(suite, ctx)
    csv_path = harness.write_csv(base.with_suffix(".csv"), columns(module), records)
    plot = getattr(module, "plot", None)
    note = plot(base.with_suffix(".png"), records, ctx) if plot else default_plot(base.with_suffix(".png"), suite,
                                                                                  records, peers)
    ctx.console(f"{suite}: wrote {csv_path}; {note}")
    return csv_path, records


def run_suite(suite: str, module, ctx: Context) -> tuple[Path, list[dict]]:
    start = time.time()
    torch.manual_seed(0)
    rows = module.run(ctx)
    path, records = finish(suite, module, rows, ctx)
    ctx.console(f"{suite}: {time.time() - start:.0f} s")
    return path, records
