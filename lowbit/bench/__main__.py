"""`python -m lowbit.bench SUITE ...` runs the same command as `lowbit bench SUITE ...`."""
import sys

from .cli import main

sys.exit(main())
