"""`python -m lowbit ...` (what `deepspeed -m lowbit` and `torchrun -m lowbit` run): the `lowbit` command."""
import sys

from .cli import main

sys.exit(main())
