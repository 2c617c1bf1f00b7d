"""Without a GPU, Triton kernels run in its interpreter. Triton reads TRITON_INTERPRET once, when it
is first imported, so it is set here, before any test module (or torch.compile) can import it."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
