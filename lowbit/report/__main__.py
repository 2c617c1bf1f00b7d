"""`python -m lowbit.report convergence ...` runs the same command as `lowbit report convergence ...`."""
import sys

from .cli import main

sys.exit(main())
