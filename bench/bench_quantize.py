"""`make bench`: the quantize, hadamard and qmatmul suites of `lowbit bench` (extra arguments pass through).

    python bench/bench_quantize.py            # = lowbit bench quantize hadamard qmatmul
    python bench/bench_quantize.py --quick    # small shapes, seconds
"""
import sys

from lowbit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", "hadamard", "qmatmul", *sys.argv[1:]]))
