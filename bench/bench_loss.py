"""The loss suite of `lowbit bench` (extra arguments pass through).

    python bench/bench_loss.py --quick        # = lowbit bench loss --quick
"""
import sys

from lowbit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["loss", *sys.argv[1:]]))
