"""Block-sparse attention vs dense SDPA at 50/20/10 % density: the `attention` suite of `lowbit bench`.

    python bench/bench_attention.py            # seq 4k and 8k on CPU (32k on a GPU)
    python bench/bench_attention.py --quick    # seq 1k and 2k, seconds
Results: bench/results/<machine>/attention[-quick].csv and .png.
"""
import sys

from lowbit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["attention", *sys.argv[1:]]))
