"""`lowbit bench SUITE [SUITE ...] [--shapes MODEL ...] [--tokens N] [--backend NAME] [--out DIR] [--quick | --gpu-quick]`.

Suites are discovered from the modules present in `lowbit/bench/` (see the package docstring);
a known suite whose module is missing or fails to import is reported as not available.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

import lowbit.bench
from .. import backends
from . import harness, shapes
from .suite import Context, markdown, run_suite

# The suites lowbit ships, in the order `all` runs them; other modules with `run` are found too.
KNOWN = ("quantize", "hadamard", "qmatmul", "linear", "optim", "loss", "train", "attention")
INFRASTRUCTURE = {"cli", "harness", "shapes", "suite", "__main__"}
# --gpu-quick: the shapes the GPU targets are stated for (Llama-3-8B MLP, 8192 tokens), timed briefly.
GPU_QUICK_SHAPES, GPU_QUICK_TOKENS = ("llama-8b",), 8192


def discover() -> tuple[dict[str, object], dict[str, str]]:
    """(available suite modules by name, unavailable suite name -> why)."""
    present = [m.name for m in pkgutil.iter_modules(lowbit.bench.__path__) if m.name not in INFRASTRUCTURE]
    names = list(KNOWN) + sorted(n for n in present if n not in KNOWN)
    found, missing = {}, {}
    for name in names:
        if name not in present:
            missing[name] = f"lowbit/bench/{name}.py is not part of this installation"
            continue
        try:
            mod = importlib.import_module(f"lowbit.bench.{name}")
        except Exception as e:  # a suite whose dependencies are broken must not take the others down
            missing[name] = f"import failed: {type(e).__name__}: {e}"
            continue
        if callable(getattr(mod, "run", None)):
            found[name] = mod
        elif name in KNOWN:
            missing[name] = f"lowbit/bench/{name}.py defines no run(ctx)"
    return found, missing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit bench", description="time lowbit's ops against the machine's limits and the installed peers",
        epilog="suites: " + ", ".join(KNOWN) + ", all.  models for --shapes: " + ", ".join(shapes.MODELS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run, or 'all'")
    p.add_argument("--shapes", nargs="+", default=[], metavar="MODEL",
                   help="model shapes to use (default: each suite's own choice)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"rows of the activations (default {shapes.TOKENS}, --quick {shapes.QUICK_TOKENS})")
    p.add_argument("--backend", default=None, help="lowbit backend (ref, cpu, cuda, triton; default: automatic)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", type=Path, default=None, help="output directory (default bench/results/<machine>/)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (seconds per suite)")
    p.add_argument("--gpu-quick", action="store_true",
                   help=f"a GPU's target shapes ({GPU_QUICK_SHAPES[0]}, {GPU_QUICK_TOKENS} tokens unless --shapes / "
                        "--tokens say otherwise) with short timings: what make gpu-check runs")
    p.add_argument("--list", action="store_true", help="list the suites and whether each is available")
    p.add_argument("--markdown", type=Path, metavar="CSV", help="print a results CSV as a markdown table and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.markdown:
        print(markdown(harness.read_csv(args.markdown)))
        return 0
    found, missing = discover()
    if args.list or not args.suites:
        for name in list(found) + [n for n in missing if n not in found]:
            desc = getattr(found[name], "DESCRIPTION", "") if name in found else f"not available: {missing[name]}"
            print(f"  {name:<10} {desc}")
        return 0 if args.list else 2
    wanted = list(found) if "all" in args.suites else args.suites
    unknown = [s for s in wanted if s not in found and s not in missing]
    if unknown:
        print(f"lowbit bench: unknown suite {unknown[0]!r}; expected one of {', '.join(list(KNOWN) + ['all'])}",
              file=sys.stderr)
        return 2
    if args.backend is not None:
        try:
            backends.check_name(args.backend)
        except ValueError as e:
            print(f"lowbit bench: {e}", file=sys.stderr)
            return 2
    try:
        shapes.select(args.shapes)
    except ValueError as e:
        print(f"lowbit bench: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("lowbit bench: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    if args.gpu_quick and (device != "cuda" or args.quick):
        print("lowbit bench: --gpu-quick times a GPU at its target shapes; on a CPU (or for small shapes) use --quick",
              file=sys.stderr)
        return 2
    if args.gpu_quick:
        args.shapes = args.shapes or list(GPU_QUICK_SHAPES)
        args.tokens = args.tokens or GPU_QUICK_TOKENS
    machine = harness.machine_name(device)
    out = harness.results_dir(machine, args.out)
    print(f"lowbit bench on {machine} ({device}, {torch.get_num_threads()} threads); results in {out}", flush=True)
    short = args.quick or args.gpu_quick
    tk = dict(warmup=1, min_runs=3 if short else 5, min_time=0.2 if short else 1.0)
    limits = harness.Limits.measure(device, short, **tk)
    print("limits: " + ", ".join(f"{k} {v:.4g}" for k, v in limits.values.items()), flush=True)
    ctx = Context(device=device, machine=machine, backend=args.backend, shapes=list(args.shapes),
                  tokens=args.tokens or (shapes.QUICK_TOKENS if args.quick else shapes.TOKENS), quick=args.quick,
                  out=out, limits=limits, short=args.gpu_quick)
    rc = 0
    for name in wanted:
        if name not in found:
            print(f"{name}: not available ({missing[name]})", flush=True)
            rc = rc if "all" in args.suites else 2
            continue
        run_suite(name, found[name], ctx)
    return rc


if __name__ == "__main__":
    sys.exit(main())
