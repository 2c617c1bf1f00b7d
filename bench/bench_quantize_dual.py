"""quantize_dual against the two `quantize` calls it replaces, per recipe operand pair.

    python bench/bench_quantize_dual.py                    # default device backend, 2048 x 2048
    python bench/bench_quantize_dual.py --tokens 4000 --features 4096 --backend triton

Per pair: the median time of (a) the two calls nn.functional made (pad rows + quantize along K,
pad and transpose + quantize along the tokens) and (b) one `quantize_dual` call, on the same
backend; then, per recipe, how many quantize / quantize_dual calls one Linear forward + backward
makes. Timings are only meaningful on a device: under TRITON_INTERPRET=1 the kernels run in numpy.
On CPU the C++ backend's quantize_dual is itself two quantize calls, so (a) ~ (b) there.
"""
import argparse
import statistics
import time

import torch

import lowbit
from lowbit import backends
from lowbit.nn import functional as F
from lowbit.nn.recipe import RECIPES


def pairs(recipe, tokens, features):
    wpad = max(recipe.wgrad_input.reduction_multiple(), recipe.wgrad_grad.reduction_multiple())
    ops = {"x": (recipe.fprop_input, 0, recipe.fprop_input.rows_multiple(), recipe.wgrad_input, 7, wpad),
           "dy": (recipe.dgrad_grad, 5, recipe.dgrad_grad.rows_multiple(), recipe.wgrad_grad, 7, wpad)}
    for tensor, (a, sa, pa, b, sb, pb) in ops.items():
        yield tensor, F.operand_spec(a, sa, pa), F.operand_spec(b, sb, pb)


def two_calls(x, row, col, backend):
    def q(t, s):
        return lowbit.quantize(t, s.fmt, block=s.block, rounding=s.rounding, seed=s.seed, scale_mode=s.scale_mode,
                               hadamard=s.hadamard, backend=backend)
    return q(F.pad_rows(x, row.pad), row), q(F.pad_cols(x.t(), col.pad), col)


def timed(fns, repeat, device):
    """Median ms of each fn, the runs interleaved so that load from other processes hits all alike."""
    times = [[] for _ in fns]
    for i in range(repeat + 1):  # the first round compiles / warms caches
        for fn, ts in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def count_calls(name, tokens, features):
    """(quantize calls, quantize_dual calls) in one Linear forward + backward of `name`."""
    counts = {"quantize": 0, "quantize_dual": 0}
    real_q, real_d = F.quantize, F.quantize_dual

    def q(*a, **k):
        counts["quantize"] += 1
        return real_q(*a, **k)

    def d(*a, **k):
        counts["quantize_dual"] += 1
        return real_d(*a, **k)
    F.quantize, F.quantize_dual = q, d
    try:
        fin = max(features, 128)
        x = torch.randn(tokens, fin, requires_grad=True)
        w = torch.randn(128, fin, requires_grad=True)
        F.lowbit_linear(x, w, None, RECIPES[name]).sum().backward()
    finally:
        F.quantize, F.quantize_dual = real_q, real_d
    return counts["quantize"], counts["quantize_dual"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2047, help="T (2047: every padding path runs)")
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="a backend name (default: the registry's choice)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    chosen = args.backend or backends.resolve("quantize_dual", dev)
    print(f"device {dev}, quantize_dual -> {chosen}, quantize -> {args.backend or backends.resolve('quantize', dev)}, "
          f"x [{args.tokens}, {args.features}] {args.dtype}, median of {args.repeat}")
    print(f"{'recipe/tensor':<22} {'two calls ms':>12} {'dual ms':>9} {'speed-up':>9}")
    for name, recipe in RECIPES.items():
        if not recipe.quantizes or recipe.shape_problem(args.features, args.features):
            continue
        for tensor, row, col in pairs(recipe, args.tokens, args.features):
            x = torch.randn(args.tokens, args.features, device=dev).to(dtype)
            a, b = timed([lambda: two_calls(x, row, col, args.backend),
                          lambda: lowbit.quantize_dual(x, row, col, backend=args.backend)], args.repeat, dev)
            print(f"{name + '/' + tensor:<22} {a:12.2f} {b:9.2f} {a / b:8.2f}x")
    print("\ncalls per Linear forward + backward (x, dy and W each need two layouts):")
    for name, recipe in RECIPES.items():
        if recipe.quantizes:
            q, d = count_calls(name, 64, 128)
            print(f"  {name:<16} quantize {q}, quantize_dual {d}: {q + d} quantizing reads of a tensor where the "
                  f"dual op is fused (was {q + 2 * d})")


if __name__ == "__main__":
    main()
