"""Optimizers: Stable-SPAM, SPAM and CLASSP, with low-precision optimizer state."""
from .classp import CLASSP
from .spam import SPAM
from .stable_spam import StableSPAM
from .state import STATE_DTYPES, measured_state_bytes, state_bytes_per_param

__all__ = ["StableSPAM", "SPAM", "CLASSP", "STATE_DTYPES", "state_bytes_per_param", "measured_state_bytes"]
