"""lowbit benchmarks: `lowbit bench SUITE ...` (or `python -m lowbit.bench SUITE ...`).

    lowbit bench quantize --quick                   # seconds; bench/results/<machine>/quantize-quick.csv + .png
    lowbit bench all --shapes llama-1b llama-8b     # every suite present, on those model shapes
    lowbit bench qmatmul --backend ref --out /tmp/b # a given lowbit backend, results in /tmp/b
    lowbit bench --list                             # the suites and whether each is available

Writing a suite
===============
A suite is a module `lowbit/bench/<name>.py`. `lowbit bench` finds it by its file name (no
registration); a suite that is missing, fails to import or defines no `run` is listed as
"not available" and `lowbit bench all` goes on with the others. The module defines:

    DESCRIPTION: str                  one line, shown by `lowbit bench --list`
    PARAMS: tuple[str, ...]           the suite's own CSV columns (e.g. ("format", "rounding"))
    PEERS: dict[str, str | None]      peer name -> the Python package it needs (None: always present,
                                      e.g. "torch"); each peer becomes two columns,
                                      `<peer>_p50_ms` and `speedup_vs_<peer>` (= peer p50 / lowbit p50)
    def run(ctx: Context) -> list[Row]
    def plot(path: Path, records: list[dict], ctx: Context) -> str     optional; the default draws,
                                      per case, the fraction of the machine limit and the speedup
                                      over each timed peer. Returns a note ("wrote x.png" or why not).

`run` times lowbit and its peers on the same inputs and returns one `Row` per case; it neither
prints results nor writes files (the harness does: console table, CSV, PNG). It should print a
short progress line per case with `ctx.console(...)` when a case takes more than a second.

    Row(case, timing, shape="", dtype="", work=None, unit="", limit=None, peers={}, params={},
        backend=None, note="")
        case     label unique within the suite ("nvfp4 nearest rht16")
        timing   lowbit's `Timing` (from `ctx.time(fn)`), or None when not run (say why in note)
        work     per call: bytes read + written (unit "GB/s"), flops ("TFLOP/s"), tokens ("tokens/s")
                 or steps ("steps/s"); rate = work / p50
        limit    the `ctx.limits` entry `rate` is compared with; its unit must be the row's unit:
                 "copy_GB/s" (memory-bound ops, optimizer steps), "fp32_mm_TFLOP/s" (GEMMs on CPU),
                 on a known GPU also "peak_bf16_TFLOP/s", "peak_fp8_TFLOP/s", "peak_fp4_TFLOP/s",
                 "peak_mem_GB/s" (datasheet, dense). The ratio is computed by the harness.
        peers    {peer: Timing} for each peer that did the same work, or a status string:
                 `NOT_APPLICABLE` ("n/a": no such op, or not on this device) or a reason
                 ("skipped: logits exceed 12 GiB"). A peer whose package (PEERS) does not import is
                 written as `ABSENT` ("absent") by the harness, whatever the row says; never drop it.
        params   values of the PARAMS columns (other keys are an error)
        backend  lowbit backend that served the case (`ctx.backend_for("quantize")`); default
                 --backend or "auto"

    Context (one per `lowbit bench` run, shared by the suites):
        ctx.device    "cpu" | "cuda"             ctx.machine  results folder name (CPU/GPU model)
        ctx.backend   --backend or None          ctx.quick    --quick: small shapes, short timings
        ctx.tokens    activation rows M (--tokens; 4096, or 512 with --quick)
        ctx.shapes    --shapes model names; use `ctx.models(default=(...), quick=(...))`, which
                      returns `lowbit.bench.shapes.ModelShape`s: .linears(M), .mlp(M),
                      .attention(batch), .lm_head(M), .hidden, .vocab, ... (see shapes.py)
        ctx.limits    `harness.Limits`, measured once at the start of the run: .values[name]
        ctx.time(fn, label, **overrides) -> Timing   warm-up + torch.utils.benchmark blocks;
                      p20/p50/p80 over the samples; overrides e.g. min_runs=2, min_time=0.0 for
                      slow steps
        ctx.installed(package) -> bool            ctx.backend_for(op) -> lowbit backend name
        ctx.console(text)                         progress output
        ctx.out       the output folder (a suite writing extra files puts them here)

Output: `<out>/<suite>[-quick][-<backend>].csv` and `.png`, where `<out>` is `--out` or, in a
source checkout, `bench/results/<machine>/`. CSV columns, in order (`suite.columns(module)`):
    machine, device, suite, case, backend, dtype, shape, <PARAMS...>,
    p20_ms, p50_ms, p80_ms, work, unit, rate, limit, limit_value, ratio_to_limit,
    <peer>_p50_ms, speedup_vs_<peer> (for each peer), note
The first records of each CSV are the limits themselves (case "limit copy_GB/s", ...: rate is the
limit's value). Timings on a shared machine are noisy: compare the ratios of one run, never
absolute times across runs.
"""
from .harness import ABSENT, NOT_APPLICABLE, Limits, Timing, time_fn
from .suite import Context, Row

__all__ = ["ABSENT", "NOT_APPLICABLE", "Context", "Limits", "Row", "Timing", "time_fn"]
