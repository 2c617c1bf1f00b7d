"""Benchmark lowbit.quantize (every format x rounding x Hadamard), lowbit.hadamard and lowbit.qmatmul.

    python bench/bench_quantize.py                 # 4096 x 4096 bf16 and fp32 inputs (several minutes on 2 cores)
    python bench/bench_quantize.py --quick         # small shapes, seconds; writes quantize-quick.csv
    python bench/bench_quantize.py --backend ref   # a specific backend (default: lowbit's automatic choice)

Columns (bench/results/<machine>/quantize.csv):
  gbps           bytes read + written by the op (input, codes, scales) / p50 time
  ratio_to_limit quantize/hadamard: gbps / `Tensor.copy_` GB/s (read + write); qmatmul: TFLOP/s / fp32
                 `torch.mm` TFLOP/s; both limits are measured before and after the ops in this run
                 and the better of the two is used (rows op=copy_ / op=fp32_mm)
  torchao_*      torchao 0.18 MXTensor.to_mx / NVFP4Tensor.to_nvfp4 (nearest, no Hadamard, 1x32 / 1x16)
  torch_*        quantize of FP8 formats: torch's own float8 cast with the same scaling (amax, divide, cast);
                 qmatmul: an fp32 torch.mm of the same shape, timed right after it
  speedup_vs_*   peer p50 / lowbit p50 (above 1: lowbit is faster)
A peer that is not installed is reported as "absent", one without the op as "n/a".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowbit  # noqa: E402
from lowbit import backends  # noqa: E402

FIELDS = ["machine", "backend", "op", "format", "block", "rounding", "hadamard", "dtype", "shape",
          "p20_ms", "p50_ms", "p80_ms", "bytes", "gbps", "tflops", "limit", "limit_value", "ratio_to_limit",
          "torchao_p50_ms", "speedup_vs_torchao", "torch_p50_ms", "speedup_vs_torch", "note"]

FORMATS = ["fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp8_e5m2", "mxfp4", "nvfp4"]
BLOCK_VARIANTS = [("fp8_e4m3", "row"), ("fp8_e4m3", (1, 128)), ("fp8_e4m3", (128, 128)), ("nvfp4", (16, 16))]
FP8_DTYPE = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def torchao_peer(fmt: str, block, rounding: str, hadamard):
    """A closure factory for torchao's version of this quantize, or a status string."""
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception:
        return harness.ABSENT
    if rounding != "nearest" or hadamard or block is not None:
        return harness.NOT_APPLICABLE
    elems = {"mxfp8": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp4": torch.float4_e2m1fn_x2}
    if fmt in elems:
        return lambda x: (lambda: MXTensor.to_mx(x, elems[fmt], 32))
    if fmt == "nvfp4":
        return lambda x: (lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())))
    return harness.NOT_APPLICABLE


def torch_fp8_peer(fmt: str, block, rounding: str, hadamard):
    """torch's own float8 cast with lowbit's scaling: amax per block, divide, saturating cast."""
    if fmt not in FP8_DTYPE or rounding != "nearest" or hadamard:
        return harness.NOT_APPLICABLE
    dtype, mx = FP8_DTYPE[fmt]

    def make(x):
        R, K = x.shape
        if block is None:
            def f():
                xf = x.float()
                return (xf / (xf.abs().amax() / mx)).to(dtype)
        elif block == "row":
            def f():
                xf = x.float()
                return (xf / (xf.abs().amax(-1, keepdim=True) / mx)).to(dtype)
        else:
            br, bk = block

            def f():
                t = x.float().reshape(R // br, br, K // bk, bk)
                return (t / (t.abs().amax((1, 3), keepdim=True) / mx)).to(dtype).reshape(R, K)
        return f
    return make


def qbytes(q) -> int:
    n = q.data.numel() * q.data.element_size() + q.scale.numel() * q.scale.element_size()
    return n + (4 if q.global_scale is not None else 0)


def block_label(block) -> str:
    if block is None:
        return "default"
    return block if isinstance(block, str) else "x".join(map(str, block))


def run(args) -> list[dict]:
    torch.manual_seed(0)
    device = args.device
    machine = harness.machine_name(device)
    n = 512 if args.quick else 4096
    n_mm = 256 if args.quick else 2048
    tk = dict(warmup=1, min_runs=3 if args.quick else 5, min_time=0.2 if args.quick else 1.0)
    backend = args.backend or backends.resolve("quantize", device)
    rows: list[dict] = []

    def emit(row):
        row.setdefault("machine", machine)
        row.setdefault("backend", backend)
        rows.append(row)
        print("  ".join(f"{k}={harness.fmt_cell(row.get(k))}" for k in
                        ("op", "format", "block", "rounding", "hadamard", "dtype", "p50_ms", "gbps", "tflops",
                         "ratio_to_limit", "speedup_vs_torchao", "speedup_vs_torch") if row.get(k) not in (None, "")),
              flush=True)

    copy_bytes = (64 << 20) if args.quick else (512 << 20)

    def limits(when: str) -> tuple[float, float]:
        copy_t, copy_gbps = harness.copy_bandwidth(copy_bytes, **tk)
        emit(dict(op="copy_", shape=f"{copy_bytes} bytes", p20_ms=copy_t.p20 * 1e3, p50_ms=copy_t.p50 * 1e3,
                  p80_ms=copy_t.p80 * 1e3, bytes=2 * copy_bytes, gbps=copy_gbps, backend="torch", note=when))
        mm_t, mm_tflops = harness.fp32_gemm_throughput(n_mm, **tk)
        emit(dict(op="fp32_mm", shape=f"{n_mm}x{n_mm}x{n_mm}", p20_ms=mm_t.p20 * 1e3, p50_ms=mm_t.p50 * 1e3,
                  p80_ms=mm_t.p80 * 1e3, tflops=mm_tflops, backend="torch", note=when))
        return copy_gbps, mm_tflops

    # the machine's limits, measured before and after the ops; ratios use the better of the two
    first = limits("measured before the ops")
    configs = [(f, None, r, h) for f in FORMATS for r in ("nearest", "stochastic") for h in (None, 16)]
    configs += [(f, b, "nearest", None) for f, b in BLOCK_VARIANTS]
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, n, device=device).to(dtype)
        for fmt, block, rounding, had in configs:
            fn = lambda: lowbit.quantize(x, fmt, block=block, rounding=rounding, hadamard=had, seed=1, backend=backend)  # noqa: E731
            q = fn()
            nbytes = x.numel() * x.element_size() + qbytes(q)
            t = harness.time_fn(fn, f"{fmt}", **tk)
            row = dict(op="quantize", format=fmt, block=block_label(block), rounding=rounding, hadamard=had or "",
                       dtype=str(dtype).replace("torch.", ""), shape=f"{n}x{n}", p20_ms=t.p20 * 1e3,
                       p50_ms=t.p50 * 1e3, p80_ms=t.p80 * 1e3, bytes=nbytes, gbps=t.gbps(nbytes), limit="copy_GB/s")
            for key, peer in (("torchao", torchao_peer(fmt, block, rounding, had)),
                              ("torch", torch_fp8_peer(fmt, block, rounding, had))):
                if isinstance(peer, str):
                    row[f"{key}_p50_ms"] = peer
                    row[f"speedup_vs_{key}"] = peer
                    continue
                pt = harness.time_fn(peer(x), key, **tk)
                row[f"{key}_p50_ms"] = pt.p50 * 1e3
                row[f"speedup_vs_{key}"] = harness.ratio(pt.p50, t.p50)
            emit(row)

        for b in (16, n):
            fn = lambda: lowbit.hadamard(x, b, seed=1, backend=args.backend)  # noqa: E731
            t = harness.time_fn(fn, "hadamard", **tk)
            nbytes = 2 * x.numel() * x.element_size()
            emit(dict(op="hadamard", hadamard=b, dtype=str(dtype).replace("torch.", ""), shape=f"{n}x{n}",
                      backend=args.backend or backends.resolve("hadamard", device),
                      p20_ms=t.p20 * 1e3, p50_ms=t.p50 * 1e3, p80_ms=t.p80 * 1e3, bytes=nbytes, gbps=t.gbps(nbytes),
                      limit="copy_GB/s",
                      torchao_p50_ms=harness.NOT_APPLICABLE, speedup_vs_torchao=harness.NOT_APPLICABLE,
                      torch_p50_ms=harness.NOT_APPLICABLE, speedup_vs_torch=harness.NOT_APPLICABLE))

    g = torch.Generator().manual_seed(1)
    a = torch.randn(n_mm, n_mm, generator=g).to(device)
    b = torch.randn(n_mm, n_mm, generator=g).to(device)
    flops = 2 * n_mm**3
    mm_fn = lambda: torch.mm(a, b)  # noqa: E731  the fp32 matmul of the same shape, timed beside each qmatmul
    for fmt in FORMATS + ["nvfp4-16x16"]:
        block = (16, 16) if fmt == "nvfp4-16x16" else None
        name = fmt.split("-")[0]
        qa = lowbit.quantize(a, name, backend=backend)
        qb = lowbit.quantize(b, name, block=block, backend=backend)
        fn = lambda: lowbit.qmatmul(qa, qb, backend=args.backend)  # noqa: E731
        t = harness.time_fn(fn, "qmatmul", **tk)
        mm_t = harness.time_fn(mm_fn, "fp32 mm", **tk)
        emit(dict(op="qmatmul", format=name, block="1x16 x 16x16" if block else "default", dtype="float32 out",
                  shape=f"{n_mm}x{n_mm}x{n_mm}", backend=args.backend or backends.resolve("qmatmul", device),
                  p20_ms=t.p20 * 1e3, p50_ms=t.p50 * 1e3, p80_ms=t.p80 * 1e3, tflops=t.tflops(flops),
                  limit="fp32_mm_TFLOP/s",
                  torchao_p50_ms=harness.NOT_APPLICABLE, speedup_vs_torchao=harness.NOT_APPLICABLE,
                  torch_p50_ms=mm_t.p50 * 1e3, speedup_vs_torch=harness.ratio(mm_t.p50, t.p50)))

    last = limits("measured after the ops")
    copy_gbps, mm_tflops = max(first[0], last[0]), max(first[1], last[1])
    for r in rows:
        if r.get("limit") == "copy_GB/s":
            r["limit_value"], r["ratio_to_limit"] = copy_gbps, harness.ratio(r["gbps"], copy_gbps)
        elif r.get("limit") == "fp32_mm_TFLOP/s":
            r["limit_value"], r["ratio_to_limit"] = mm_tflops, harness.ratio(r["tflops"], mm_tflops)
    print(f"limits: copy_ {copy_gbps:.2f} GB/s, fp32 mm {mm_tflops * 1e3:.1f} GFLOP/s (best of before/after)")
    return rows


def plot(rows: list[dict], path: Path) -> str:
    q = [r for r in rows if r["op"] == "quantize"]
    labels, seen = [], set()
    for r in q:
        lab = f"{r['format']} {r['block']} {r['rounding'][:4]}{' rht' + str(r['hadamard']) if r['hadamard'] else ''}"
        if lab not in seen:
            seen.add(lab)
            labels.append(lab)
    series = {}
    for dtype in ("bfloat16", "float32"):
        by = {f"{r['format']} {r['block']} {r['rounding'][:4]}{' rht' + str(r['hadamard']) if r['hadamard'] else ''}":
              r["ratio_to_limit"] for r in q if r["dtype"] == dtype}
        series[f"{dtype} input"] = [by.get(lab) for lab in labels]
    title = (f"lowbit.quantize on {rows[0]['machine']} ({q[0]['backend']} backend): "
             f"GB/s as a fraction of Tensor.copy_ ({float(q[0]['limit_value']):.1f} GB/s)")
    return harness.bar_chart(path, title, labels, series, "fraction of copy_ bandwidth", hline=0.5)


def markdown(rows: list[dict], dtype: str = "bfloat16") -> str:
    """The README's headline table from a quantize.csv (default blocks, `dtype` input)."""
    copy_gbps = max(float(r["gbps"]) for r in rows if r["op"] == "copy_")
    mm_tflops = max(float(r["tflops"]) for r in rows if r["op"] == "fp32_mm")
    quant = [r for r in rows if r["op"] == "quantize"]
    out = [f"Machine `{rows[0]['machine']}`, backend `{quant[0]['backend']}`; `Tensor.copy_` "
           f"{copy_gbps:.1f} GB/s and fp32 `torch.mm` {mm_tflops * 1e3:.0f} GFLOP/s, the better of two "
           f"measurements taken before and after the ops in the same run.", "",
           f"| quantize {quant[0]['shape']} {dtype} | rounding | RHT | p50 ms | GB/s | of copy_ | vs torchao | vs torch cast |",
           "|---|---|---|---|---|---|---|---|"]

    def cell(v, pct=False):
        if v in ("", None):
            return ""
        try:
            f = float(v)
        except ValueError:
            return v
        return f"{100 * f:.0f} %" if pct else (f"{f:.2f}x" if not pct else "")

    for r in rows:
        if r["op"] != "quantize" or r["dtype"] != dtype or r["block"] != "default":
            continue
        out.append(f"| {r['format']} | {r['rounding']} | {r['hadamard'] or '-'} | {float(r['p50_ms']):.1f} | "
                   f"{float(r['gbps']):.2f} | {cell(r['ratio_to_limit'], True)} | {cell(r['speedup_vs_torchao'])} | "
                   f"{cell(r['speedup_vs_torch'])} |")
    out += ["", "| other ops | shape | p50 ms | rate | of the machine limit | vs torch |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "hadamard" and r["dtype"] == dtype:
            out.append(f"| hadamard b={r['hadamard']} ({dtype}) | {r['shape']} | {float(r['p50_ms']):.1f} | "
                       f"{float(r['gbps']):.2f} GB/s | {cell(r['ratio_to_limit'], True)} of copy_ | |")
        if r["op"] == "qmatmul":
            out.append(f"| qmatmul {r['format']} ({r['block']}) | {r['shape']} | {float(r['p50_ms']):.1f} | "
                       f"{float(r['tflops']) * 1e3:.1f} GFLOP/s | {cell(r['ratio_to_limit'], True)} of fp32 mm | "
                       f"{cell(r['speedup_vs_torch'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (seconds); writes quantize-quick.csv")
    p.add_argument("--backend", default=None, choices=list(backends.NAMES), help="default: lowbit's automatic choice")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", metavar="CSV", help="print the README table of an existing quantize.csv and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(harness.read_csv(Path(args.markdown))))
        return 0
    start = time.time()
    print(lowbit.__name__, "backend:", args.backend or backends.resolve("quantize", args.device),
          "threads:", torch.get_num_threads(), flush=True)
    rows = run(args)
    out = harness.results_dir(rows[0]["machine"])
    stem = "quantize-quick" if args.quick else "quantize"
    if args.backend:
        stem += f"-{args.backend}"
    csv_path = harness.write_csv(out / f"{stem}.csv", FIELDS, rows)
    note = plot(rows, out / f"{stem}.png")
    print(f"wrote {csv_path}; {note}; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
