"""The train suite of `lowbit bench` (extra arguments pass through).

    python bench/bench_train.py --quick        # = lowbit bench train --quick
"""
import sys

from lowbit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
