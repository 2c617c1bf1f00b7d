"""The optim suite of `lowbit bench` (extra arguments pass through).

    python bench/bench_optim.py --quick        # = lowbit bench optim --quick
"""
import sys

from lowbit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["optim", *sys.argv[1:]]))
