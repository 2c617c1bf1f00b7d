"""Time and peak memory of the LM-head loss step (forward + backward): fused vs unfused vs F.cross_entropy.

    python bench/bench_loss.py            # vocab 32k / 128k, 4k-16k tokens
    python bench/bench_loss.py --quick    # small shapes, a minute or two

Methods, all computing an NLL-family loss of ``hidden @ weight.T`` and the gradients of hidden and weight:
  plain_ce  F.cross_entropy on materialised logits (the torch baseline)
  unfused   lowbit.objectives.sft_loss on materialised logits (fp32 log-softmax)
  fused     lowbit.objectives.fused_linear_sft_loss (chunked, logits never materialised)
  liger     Liger-Kernel's LigerFusedLinearCrossEntropyLoss, where installed

Time: bench/harness.py's timer (torch.utils.benchmark), one warm-up run then ``--repeat`` single-call
samples; p20/p50/p80 of those.
Peak memory: bytes of tensor storage live at once during the warm-up run, tracked per allocation
with lowbit.objectives.TensorMemoryTracker (inputs excluded). A configuration whose materialised
logits would not fit in ``--mem-limit-gib`` is skipped for the unfused methods and recorded as such.
Timings on a shared machine are noisy: compare ratios from one run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lowbit.objectives import TensorMemoryTracker, fused_linear_sft_loss, sft_loss  # noqa: E402

FIELDS = ["machine", "vocab", "tokens", "hidden", "objective", "method", "time_p20_s", "time_p50_s", "time_p80_s",
          "peak_mib", "time_vs_unfused", "peak_vs_unfused", "time_vs_plain_ce", "note"]


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss()


def make_step(method: str, h, w, y, objective: str, liger=None):
    def step():
        h.grad = None
        w.grad = None
        if method == "plain_ce":
            loss = F.cross_entropy(h @ w.t(), y)
        elif method == "unfused":
            loss = sft_loss(h @ w.t(), y, objective=objective)
        elif method == "fused":
            loss = fused_linear_sft_loss(h, w, y, objective=objective)
        elif method == "liger":
            loss = liger(w, h, y)
        else:
            raise ValueError(method)
        loss.backward()
    return step


def measure(step, repeat: int) -> tuple[harness.Timing, int]:
    with TensorMemoryTracker() as tracker:  # the warm-up run doubles as the memory run
        step()
    # Each step takes seconds: one call per sample, `repeat` samples.
    return harness.time_fn(step, warmup=0, min_runs=repeat, min_time=0.0), tracker.peak


def run(vocabs, token_counts, hidden, objectives, repeat, mem_limit_gib, out_csv: Path):
    torch.manual_seed(0)
    liger = liger_loss()
    methods = ["plain_ce", "unfused", "fused"] + (["liger"] if liger is not None else [])
    rows = []
    machine = harness.machine_name()
    for vocab in vocabs:
        for n in token_counts:
            for objective in objectives:
                h = torch.randn(n, hidden, requires_grad=True)
                w = (torch.randn(vocab, hidden) / hidden ** 0.5).requires_grad_(True)
                y = torch.randint(0, vocab, (n,))
                # Unfused steps hold logits, log-softmax and its gradient: about 3 fp32 N x V tensors.
                materialised_gib = 3 * n * vocab * 4 / 2 ** 30
                results = {}
                for method in methods:
                    if objective != "nll" and method in ("plain_ce", "liger"):
                        continue
                    row = {"machine": machine, "vocab": vocab, "tokens": n, "hidden": hidden, "objective": objective,
                           "method": method, "note": ""}
                    if method in ("plain_ce", "unfused") and materialised_gib > mem_limit_gib:
                        row["note"] = f"skipped: ~{materialised_gib:.0f} GiB of logits > --mem-limit-gib {mem_limit_gib}"
                        rows.append(row)
                        print(f"V={vocab} N={n} {objective:8s} {method:9s} {row['note']}", flush=True)
                        continue
                    t0 = time.perf_counter()
                    timing, peak = measure(make_step(method, h, w, y, objective, liger), repeat)
                    p50 = timing.p50
                    row.update(time_p20_s=timing.p20, time_p50_s=p50, time_p80_s=timing.p80,
                               peak_mib=peak / 2 ** 20)
                    results[method] = (p50, peak)
                    rows.append(row)
                    print(f"V={vocab} N={n} {objective:8s} {method:9s} p50 {p50:8.3f} s  peak {peak / 2 ** 20:9.1f} MiB"
                          f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
                for row in rows:
                    if (row["vocab"], row["tokens"], row["objective"]) != (vocab, n, objective) or "peak_mib" not in row:
                        continue
                    p50, peak = results[row["method"]]
                    if "unfused" in results:
                        row["time_vs_unfused"] = harness.ratio(p50, results["unfused"][0])
                        row["peak_vs_unfused"] = harness.ratio(peak, results["unfused"][1])
                    if "plain_ce" in results:
                        row["time_vs_plain_ce"] = harness.ratio(p50, results["plain_ce"][0])
                del h, w, y
                write_csv(rows, out_csv)  # after every point, so an interrupted run keeps what it measured
    print(f"wrote {out_csv}")
    return rows


def write_csv(rows, out_csv: Path) -> None:
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    harness.write_csv(out_csv, FIELDS, rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (vocab 32k/128k, 1k-2k tokens)")
    ap.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (default 32000 128256)")
    ap.add_argument("--tokens", type=int, nargs="*", help="token counts (default 4096 8192 16384)")
    ap.add_argument("--hidden", type=int, help="hidden size (default 128)")
    ap.add_argument("--objectives", nargs="*", default=["nll"], help="SFT objectives to time (default nll)")
    ap.add_argument("--repeat", type=int, help="timed runs per point after the warm-up (default 2)")
    ap.add_argument("--mem-limit-gib", type=float, default=12.0,
                    help="skip unfused methods whose logits would exceed this (default 12)")
    ap.add_argument("--out", type=Path, help="CSV path (default bench/results/<machine>/loss.csv)")
    args = ap.parse_args(argv)
    vocabs = args.vocab or [32000, 128256]
    tokens = args.tokens or ([1024, 2048] if args.quick else [4096, 8192, 16384])
    hidden = args.hidden or 128
    repeat = args.repeat or 2
    out = args.out or harness.results_dir(harness.machine_name()) / ("loss_quick.csv" if args.quick else "loss.csv")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {harness.machine_name()}; hidden {hidden}",
          file=sys.stderr)
    run(vocabs, tokens, hidden, args.objectives, repeat, args.mem_limit_gib, out)


if __name__ == "__main__":
    main()
