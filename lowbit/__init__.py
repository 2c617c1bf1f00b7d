"""lowbit: low-precision (FP8 / MX / NVFP4) training kernels and layers."""
from . import formats
from .backends import use_backend
from .formats import FP8_E4M3, FP8_E5M2, INT4_ACT, INT4_WEIGHT, MXFP4, MXFP8, MXFP8_E5M2, NVFP4
from .ops import QuantizeSpec, cast, dequantize, hadamard, qmatmul, quantize, quantize_dual, stochastic_round
from .qtensor import QTensor

__version__ = "0.1.0"

__all__ = [
    "formats", "use_backend", "QTensor", "quantize", "quantize_dual", "QuantizeSpec", "dequantize", "cast",
    "stochastic_round", "hadamard", "qmatmul", "FP8_E4M3", "FP8_E5M2", "MXFP8", "MXFP8_E5M2", "MXFP4", "NVFP4",
    "INT4_WEIGHT", "INT4_ACT",
]
