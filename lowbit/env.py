"""`python -m lowbit.env`: which backend serves each op family on each device, and why the others cannot.

`python -m lowbit.env --gemm [--capability X.Y] [--out-dtype bf16|fp16|fp32] [--cuda X.Y]`: which GEMM
path (`lowbit.backends.gemm`) each recipe's fprop / dgrad / wgrad takes on a GPU of that compute
capability, and why - on a CPU-only machine too.
"""
from __future__ import annotations

import argparse
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


OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _features_line(f) -> str:
    cuda = f"CUDA {f.cuda[0]}.{f.cuda[1]}" if f.cuda else \
        f"no CUDA in this build (cuBLAS taken as {f.cublas[0]}.{f.cublas[1]}; --cuda X.Y to change)"
    api = ("F.scaled_mm" if f.f_scaled_mm else "no F.scaled_mm") + (", torch._scaled_mm" if f.v1_scaled_mm else "")
    triton = "Triton GEMM available" if f.triton is None else f"no Triton GEMM ({f.triton})"
    return f"torch {torch.__version__}: {api}; {cuda}; {triton}"


def gemm_report(capability=None, out_dtype: torch.dtype = torch.bfloat16, cuda=None) -> str:
    """Per recipe and GEMM: the path `lowbit.backends.gemm` picks on `capability` (default: this GPU)."""
    from .backends import gemm
    from .nn.recipe import RECIPES

    note = None
    if capability is None:
        if torch.cuda.is_available():
            capability = torch.cuda.get_device_capability()
        else:
            capability, note = (9, 0), "no GPU: showing 9.0"
    cap = gemm.capability_of(capability)
    f = gemm.detect() if cuda is None else gemm.with_cuda(gemm.detect(), cuda)
    name = {v: k for k, v in OUT_DTYPES.items()}[out_dtype]
    lines = [f"GEMM paths on sm_{cap[0]}{cap[1]} (compute capability {cap[0]}.{cap[1]}), GEMM output {name}",
             _features_line(f)] + ([note] if note else [])
    last = None
    for recipe, gemm_name, a, b, plan in gemm.table(RECIPES.values(), cap, f, out_dtype):
        if recipe != last:
            lines += ["", recipe]
            last = recipe
        roles = "{} . {}".format(*gemm.GEMM_ROLES[gemm_name])
        if plan is None:
            lines.append(f"  {gemm_name:<6} {roles:<11} not quantized (high-precision matmul)")
            continue
        how = f" {plan.api} {plan.scaling[0]} x {plan.scaling[1]}" if plan.path == "scaled_mm" else ""
        lines.append(f"  {gemm_name:<6} {roles:<11} {a} x {b}  ->  {plan.path}{how}")
        lines.append(f"  {'':<18} {plan.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowbit.env", description=__doc__.splitlines()[0])
    parser.add_argument("--gemm", action="store_true", help="print the GEMM path of every recipe's GEMMs")
    parser.add_argument("--capability", help="compute capability X.Y for --gemm (default: this GPU, else 9.0)")
    parser.add_argument("--out-dtype", choices=tuple(OUT_DTYPES), default="bf16", help="GEMM output dtype for --gemm")
    parser.add_argument("--cuda", help="CUDA version X.Y torch is taken to be built with, for --gemm")
    args = parser.parse_args(argv)
    if args.gemm:
        print(gemm_report(args.capability, OUT_DTYPES[args.out_dtype], args.cuda))
    else:
        print(report())


if __name__ == "__main__":
    main()
